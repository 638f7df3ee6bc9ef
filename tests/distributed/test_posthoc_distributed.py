"""PostHocEMA on 2 CPU processes (gloo): DDP writes from rank 0 only; FSDP2 ranks write their own shards, which
synthesis puts together in this process. Checked against a plain-loop power-function EMA of the recorded weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from launch import load_ranks, run_worker
from support import assert_close_to_reference, reference_ema

from lightning_ema.posthoc import list_snapshots, read_snapshot, synthesize

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]
WORKER = Path(__file__).with_name("posthoc_worker.py")
SIGMAS = (0.05, 0.10)
STEPS = 12  # 3 epochs of 4 steps: 64 samples, 2 ranks, batch 8


def karras(sigma_rel: float):  # type: ignore[no-untyped-def]
    s = sigma_rel**-2
    gamma = float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())
    return lambda t: (1.0 - 1.0 / t) ** (gamma + 1.0)


def run(mode: str, out: Path) -> list[dict]:
    run_worker(WORKER, mode, str(out), timeout=300)
    return load_ranks(out)


def expected_at(state: dict, step: int, sigma_rel: float) -> dict[str, torch.Tensor]:
    position = state["steps"].index(step) + 1
    return reference_ema(state["initial"], state["steps"][:position], state["states"][:position], karras(sigma_rel))


def test_ddp_rank_zero_writes_the_snapshots(tmp_path: Path) -> None:
    ranks = run("ddp", tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    folder = tmp_path / "snapshots"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{s:010d}.pt" for s in (4, 8, 12)]
    for step in (4, 12):
        _, emas = read_snapshot(folder / f"step-{step:010d}.pt")
        for index, sigma in enumerate(SIGMAS):
            assert_close_to_reference(emas[index], expected_at(ranks[0], step, sigma))
    synthesised = synthesize(folder, 0.07)
    assert set(synthesised) >= {"net.0.weight", "net.1.running_mean", "net.1.num_batches_tracked"}


def test_fsdp2_ranks_write_their_own_shards_and_synthesis_puts_them_together(tmp_path: Path) -> None:
    ranks = run("fsdp2", tmp_path)
    folder = tmp_path / "snapshots"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"step-{s:010d}.rank{r}-of-2.pt" for s in (4, 8, 12) for r in (0, 1)]
    (snapshot, *_), last = list_snapshots(folder), list_snapshots(folder)[-1]
    assert snapshot.step == 4 and last.step == STEPS and len(last.files) == 2
    # each rank's file holds its own shard (torch.chunk over dim 0), nothing gathered
    header1, emas1 = read_snapshot(folder / f"step-{STEPS:010d}.rank1-of-2.pt")
    assert header1["rank"] == 1 and header1["world_size"] == 2
    assert emas1[0]["net.2.weight"].shape == (2, 6) and header1["shards"]["net.2.weight"]["offset"] == [3, 0]
    assert emas1[0]["head.weight"].shape == (0, 5)
    _, emas0 = read_snapshot(folder / f"step-{STEPS:010d}.rank0-of-2.pt")
    for index, sigma in enumerate(SIGMAS):
        expected = expected_at(ranks[0], STEPS, sigma)
        put_together = {name: torch.cat([emas0[index][name], emas1[index][name]]) for name in expected}
        assert_close_to_reference(put_together, expected)
    # a tracked width at the last snapshot step is that snapshot, now as full tensors
    synthesised = synthesize(folder, 0.10)
    assert_close_to_reference(synthesised, expected_at(ranks[0], STEPS, 0.10), atol=1e-5)
    assert synthesised["net.2.weight"].shape == (5, 6) and synthesised["head.weight"].shape == (1, 5)
