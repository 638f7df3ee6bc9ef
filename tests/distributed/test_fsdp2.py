"""FSDP2 through ModelParallelStrategy on CPU with gloo (2 processes, data_parallel_size=2).

Every rank keeps the EMA of its own shards only; checked against a plain-loop EMA of the FULL weights gathered
after each step, sliced as FSDP2 shards dim 0 (``torch.chunk`` over the ranks, empty when there is no chunk).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from launch import load_ranks, run_worker
from support import constant_decay, reference_ema

from lightning_ema import load_ema_state_dict
from lightning_ema.__main__ import main
from lightning_ema.checkpoint import load_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
WORKER = Path(__file__).with_name("fsdp2_worker.py")
DECAY = 0.8
STEPS_PER_EPOCH = 4  # 64 samples, 2 ranks, batch 8


def run(out: Path, *args: str) -> list[dict]:
    run_worker(WORKER, str(out), *args, timeout=300)
    return load_ranks(out)


def expected_shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    chunks = torch.chunk(full, 2, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def reference(rank_state: dict) -> dict[str, torch.Tensor]:
    return reference_ema(
        rank_state["initial"],
        rank_state["steps"],
        rank_state["states"],
        constant_decay(DECAY),
        initial_step=rank_state["initial_step"],
    )


def assert_shards(ranks: list[dict], full: dict[str, torch.Tensor]) -> None:
    for rank, state in enumerate(ranks):
        for name, tensor in full.items():
            shard = state["ema"][name]
            wanted = expected_shard(tensor, rank)
            assert shard.shape == wanted.shape, (rank, name, shard.shape, wanted.shape)
            assert torch.allclose(shard.double(), wanted, atol=1e-6), (rank, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run(tmp_path_factory.mktemp("whole"), "--max-epochs", "4")


def test_each_rank_keeps_the_ema_of_its_own_shard(uninterrupted: list[dict]) -> None:
    full = reference(uninterrupted[0])
    assert_shards(uninterrupted, full)
    # uneven (5 rows over 2 ranks) and empty (1 row) shards: 1/world of the EMA memory per rank
    assert uninterrupted[0]["ema"]["net.2.weight"].shape == (3, 6)
    assert uninterrupted[1]["ema"]["net.2.weight"].shape == (2, 6)
    assert uninterrupted[1]["ema"]["head.weight"].shape == (0, 5)
    assert uninterrupted[0]["num_updates"] == uninterrupted[1]["num_updates"] == 4 * STEPS_PER_EPOCH


def test_validation_computes_with_the_ema_and_training_with_the_raw_weights(uninterrupted: list[dict]) -> None:
    state = uninterrupted[0]
    seen = state["seen_in_validation"]
    assert len(seen) == 4
    for epoch, weights in enumerate(seen):
        position = state["steps"].index((epoch + 1) * STEPS_PER_EPOCH) + 1
        expected = reference_ema(
            state["initial"], state["steps"][:position], state["states"][:position], constant_decay(DECAY)
        )
        for name, tensor in expected.items():
            assert torch.allclose(weights[name].double(), tensor, atol=1e-6), (epoch, name)
    # and the weights after the run are the raw ones, not an EMA left behind by a swap
    for name, tensor in state["raw"].items():
        assert torch.equal(tensor, state["states"][-1][name]), name


@pytest.mark.parametrize("layout", ["distributed", "single-file"])
def test_resume_equals_the_uninterrupted_run(tmp_path: Path, uninterrupted: list[dict], layout: str) -> None:
    extra = ["--single-file"] if layout == "single-file" else []
    first = run(tmp_path / "first", "--max-epochs", "2", *extra)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (layout == "distributed")
    resumed = run(tmp_path / "resumed", "--max-epochs", "4", "--ckpt-path", str(last), *extra)
    for rank in (0, 1):
        assert resumed[rank]["num_updates"] == uninterrupted[rank]["num_updates"]
        for name, tensor in uninterrupted[rank]["ema"].items():
            assert torch.equal(resumed[rank]["ema"][name], tensor), (layout, rank, name)
    # consolidation for inference, in this single process: the full EMA is the ranks' shards put together
    weights = load_ema_state_dict(last)
    for name in first[0]["ema"]:
        assert torch.equal(weights[name], torch.cat([first[0]["ema"][name], first[1]["ema"][name]])), name
    raw = load_checkpoint(last)["state_dict"]
    assert not any(key.startswith("__ema__") for key in raw)
    for name, tensor in first[0]["raw"].items():
        assert torch.equal(raw[name], tensor), name
    if layout == "distributed":
        assert_real_folder_is_read_safely(last, tmp_path)


def assert_real_folder_is_read_safely(folder: Path, tmp_path: Path) -> None:
    """A folder ModelParallelStrategy wrote passes the restricted .metadata reader; a crafted copy runs nothing."""
    assert main(["list", str(folder)]) == 0
    copy = tmp_path / "crafted"
    shutil.copytree(folder, copy)
    marker = tmp_path / "pwned"
    with open(copy / ".metadata", "rb") as stream:
        metadata = pickle.load(stream)  # written by the run above
    metadata.planner_data = {"x": _Payload(marker)}
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="could run code"):
        load_ema_state_dict(copy)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
