"""``EMA`` in Lightning Fabric loops on 2 CPU processes (gloo): DDP against the Trainer, FSDP2 shard by shard.

Each run is ``fabric_worker.py`` in a subprocess (Fabric relaunches the script per rank, which must not be pytest).
DDP: the Fabric loop trains the trajectory ``ddp_worker.py`` trains under the Trainer with ``EMACallback``; every
rank's EMA must equal the Trainer's bit for bit, and the float64 reference of the recorded weights. FSDP2: every
rank keeps the EMA of its own shards (``torch.chunk`` over the ranks, empty when there is no chunk), checked
against the reference of the full weights gathered after each step. Both resume bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ddp_worker
import pytest
import torch
from launch import load_ranks, run_worker
from support import assert_close_to_reference, constant_decay, reference_ema

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
WORKER = Path(__file__).with_name("fabric_worker.py")
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 64 samples, 2 ranks, batch 8


def run(strategy: str, out: Path, *args: str) -> list[dict[str, Any]]:
    run_worker(WORKER, strategy, str(out), *args, timeout=300)
    return load_ranks(out)


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


# ============================================================================================ DDP


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run("ddp", tmp_path_factory.mktemp("ddp"), "--epochs", str(EPOCHS))


def test_fabric_ddp_gives_every_rank_the_trainers_ema_bit_for_bit(ddp: list[dict[str, Any]], tmp_path: Path) -> None:
    ddp_worker.run("ddp_fork", tmp_path, max_epochs=EPOCHS)  # the Trainer with EMACallback, same trajectory
    trainer = load_ranks(tmp_path)
    for rank in (0, 1):
        assert ddp[rank]["world_size"] == 2
        assert ddp[rank]["num_updates"] == trainer[rank]["num_updates"] == EPOCHS * STEPS_PER_EPOCH // 2
        assert_identical(ddp[rank]["raw"], trainer[rank]["raw"])  # the same trajectory
        assert_identical(ddp[rank]["ema"], trainer[rank]["ema"])
    assert_identical(ddp[1]["ema"], ddp[0]["ema"])  # rank 0's buffer EMA on every rank
    first = ddp[0]
    expected = reference_ema(
        first["initial"], first["steps"], first["states"], constant_decay(ddp_worker.DECAY), every_n_steps=2
    )
    assert_close_to_reference(first["ema"], expected)


def test_fabric_ddp_evaluates_with_the_ema_and_trains_the_raw_weights(ddp: list[dict[str, Any]]) -> None:
    first = ddp[0]
    assert len(first["seen_in_evaluation"]) == EPOCHS
    for epoch, seen in enumerate(first["seen_in_evaluation"], start=1):
        done = epoch * STEPS_PER_EPOCH
        expected = reference_ema(
            first["initial"],
            first["steps"][:done],
            first["states"][:done],
            constant_decay(ddp_worker.DECAY),
            every_n_steps=2,
        )
        assert_close_to_reference(seen, expected)
    assert_identical(first["raw"], first["states"][-1])


def test_fabric_ddp_save_and_load_resume_bit_for_bit(ddp: list[dict[str, Any]], tmp_path: Path) -> None:
    run("ddp", tmp_path / "first", "--epochs", "2", "--save-after", "2")
    checkpoint = tmp_path / "first" / "checkpoint"
    saved = torch.load(checkpoint, weights_only=True)  # one file, written by rank 0
    assert saved["epoch"] == 2 and saved["ema"]["step"] == 2 * STEPS_PER_EPOCH
    resumed = run("ddp", tmp_path / "resumed", "--epochs", str(EPOCHS), "--resume", str(checkpoint))
    for rank in (0, 1):
        assert resumed[rank]["num_updates"] == ddp[rank]["num_updates"]
        assert_identical(resumed[rank]["raw"], ddp[rank]["raw"])
        assert_identical(resumed[rank]["ema"], ddp[rank]["ema"])


# ============================================================================================ FSDP2


def expected_shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    chunks = torch.chunk(full, 2, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def assert_shards(ranks: list[dict[str, Any]], key: str, full: dict[str, torch.Tensor]) -> None:
    for rank, state in enumerate(ranks):
        for name, tensor in full.items():
            wanted = expected_shard(tensor, rank)
            assert state[key][name].shape == wanted.shape, (rank, name)
            assert torch.allclose(state[key][name].double(), wanted, atol=1e-6), (rank, name)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run("fsdp2", tmp_path_factory.mktemp("fsdp2"), "--epochs", str(EPOCHS))


def test_fabric_fsdp2_each_rank_keeps_the_ema_of_its_own_shards(fsdp2: list[dict[str, Any]]) -> None:
    first = fsdp2[0]
    full = reference_ema(first["initial"], first["steps"], first["states"], constant_decay(ddp_worker.DECAY))
    assert_shards(fsdp2, "ema", full)
    # uneven (5 rows over 2 ranks) and empty (1 row) shards: about 1/world of the EMA per rank
    assert fsdp2[0]["ema"]["net.2.weight"].shape == (3, 6) and fsdp2[1]["ema"]["net.2.weight"].shape == (2, 6)
    assert fsdp2[1]["ema"]["head.weight"].shape == (0, 5)
    assert fsdp2[0]["num_updates"] == fsdp2[1]["num_updates"] == EPOCHS * STEPS_PER_EPOCH


def test_fabric_fsdp2_evaluates_with_the_ema_and_trains_the_raw_weights(fsdp2: list[dict[str, Any]]) -> None:
    first = fsdp2[0]
    for epoch, seen in enumerate(first["seen_in_evaluation"], start=1):
        done = epoch * STEPS_PER_EPOCH
        expected = reference_ema(
            first["initial"], first["steps"][:done], first["states"][:done], constant_decay(ddp_worker.DECAY)
        )
        for name, tensor in expected.items():  # the full weights gathered inside the swap
            assert torch.allclose(seen[name].double(), tensor, atol=1e-6), (epoch, name)
    assert_identical(first["raw"], first["states"][-1])


def test_fabric_fsdp2_resume_from_fabric_checkpoint_and_per_rank_ema_is_exact(
    fsdp2: list[dict[str, Any]], tmp_path: Path
) -> None:
    run("fsdp2", tmp_path / "first", "--epochs", "2", "--save-after", "2")
    checkpoint = tmp_path / "first" / "checkpoint"
    assert checkpoint.is_dir() and {f"ema-rank{rank}.pt" for rank in (0, 1)} <= {p.name for p in checkpoint.iterdir()}
    resumed = run("fsdp2", tmp_path / "resumed", "--epochs", str(EPOCHS), "--resume", str(checkpoint))
    for rank in (0, 1):
        assert resumed[rank]["num_updates"] == fsdp2[rank]["num_updates"]
        assert_identical(resumed[rank]["ema"], fsdp2[rank]["ema"])
        assert_identical(resumed[rank]["raw"], fsdp2[rank]["raw"])
