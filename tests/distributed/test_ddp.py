"""DDP on CPU with gloo: every rank keeps the same EMA, equal to a plain-loop reference; resume is exact."""

from __future__ import annotations

from pathlib import Path

import ddp_worker
import pytest
import torch
from launch import load_ranks, run_worker
from support import TinyClassifier, assert_close_to_reference, constant_decay, reference_ema

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]
WORKER = Path(ddp_worker.__file__)


def check_ranks(out: Path) -> list[dict]:
    ranks = load_ranks(out)
    assert [r["world_size"] for r in ranks] == [2, 2]
    first, second = ranks
    assert first["num_updates"] == second["num_updates"] == first["global_step"] // 2
    for name, tensor in first["ema"].items():
        assert torch.equal(tensor, second["ema"][name]), f"EMA differs across ranks: {name}"
    # DDP keeps parameters equal across ranks; BatchNorm statistics are each rank's own until the next forward
    for name, _ in TinyClassifier().named_parameters():
        assert torch.equal(first["raw"][name], second["raw"][name]), name
    expected = reference_ema(
        first["initial"],
        first["steps"],
        first["states"],
        constant_decay(ddp_worker.DECAY),
        every_n_steps=2,
        initial_step=first["initial_step"],
    )
    assert_close_to_reference(first["ema"], expected)
    return ranks


def run_script(strategy: str, out: Path, *extra: str) -> None:
    run_worker(WORKER, strategy, str(out), *extra, timeout=240)


def test_ddp_fork_ranks_hold_identical_ema_equal_to_reference(tmp_path: Path) -> None:
    ddp_worker.run("ddp_fork", tmp_path, max_epochs=3)
    ranks = check_ranks(tmp_path)
    assert ranks[0]["global_step"] == 3 * 4  # 64 samples / 2 ranks / batch 8 = 4 steps per epoch
    # the checkpoint is written once, by rank 0, and holds the same EMA
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [s for key, s in last["callbacks"].items() if key.startswith("EMACallback")]
    for name, tensor in ranks[0]["ema"].items():
        assert torch.equal(state["emas"][0][name], tensor), name
        assert torch.equal(last["state_dict"][name], ranks[0]["raw"][name]), name


def test_ddp_fork_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    whole, first_half, resumed = tmp_path / "whole", tmp_path / "half", tmp_path / "resumed"
    ddp_worker.run("ddp_fork", whole, max_epochs=4)
    ddp_worker.run("ddp_fork", first_half, max_epochs=2)
    ddp_worker.run("ddp_fork", resumed, max_epochs=4, ckpt_path=str(first_half / "checkpoints" / "last.ckpt"))
    for expected, actual in zip(load_ranks(whole), load_ranks(resumed), strict=True):
        assert actual["num_updates"] == expected["num_updates"]
        for name, tensor in expected["ema"].items():
            assert torch.equal(actual["ema"][name], tensor), name
            assert torch.equal(actual["raw"][name], expected["raw"][name]), name


def check_handover(out: Path) -> None:
    """The process that called `fit` holds rank 0's EMA, and `trainer.test(model)` then tests with it."""
    rank0 = load_ranks(out)[0]
    main = torch.load(out / "main.pt", weights_only=True)
    assert main["num_updates"] == rank0["num_updates"] > 0
    for name, tensor in rank0["ema"].items():
        assert torch.equal(main["ema"][name], tensor), name
    for rank in (0, 1):
        tested = torch.load(out / f"test{rank}.pt", weights_only=True)
        for name, tensor in rank0["ema"].items():
            assert torch.equal(tested[name], tensor), f"rank {rank} tested {name} without the EMA"


def test_ddp_spawn_hands_the_ema_back_to_the_main_process(tmp_path: Path) -> None:
    run_script("ddp_spawn", tmp_path, "--check-handover")
    check_ranks(tmp_path)
    check_handover(tmp_path)


def test_ddp_fork_hands_the_ema_back_to_the_main_process(tmp_path: Path) -> None:
    ddp_worker.run("ddp_fork", tmp_path, max_epochs=2, check_handover=True)
    check_handover(tmp_path)


def test_strategy_ddp_relaunching_the_script_ranks_agree(tmp_path: Path) -> None:
    run_script("ddp", tmp_path)
    check_ranks(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_mean_teacher_under_ddp_fork_is_identical_across_ranks_and_equals_reference(tmp_path: Path) -> None:
    ddp_worker.run_mean_teacher("ddp_fork", tmp_path, max_epochs=2)
    first, second = (torch.load(tmp_path / f"teacher{rank}.pt", weights_only=True) for rank in (0, 1))
    assert first["num_updates"] == second["num_updates"] == 2 * 4
    expected = reference_ema(first["initial"], first["steps"], first["states"], constant_decay(ddp_worker.DECAY))
    # every teacher tensor agrees across ranks, BatchNorm statistics included (rank 0's are the model's)
    for name, tensor in first["teacher"].items():
        assert torch.equal(tensor, second["teacher"][name]), name
    for name, value in expected.items():
        assert torch.allclose(first["teacher"][name].double(), value, atol=1e-6), name
