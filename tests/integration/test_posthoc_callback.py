"""PostHocEMA with a real Trainer: snapshots against a plain-loop power-function EMA, synthesis against an EMA tracked
directly in the same run, resume, the sweep, evaluation with a tracked EMA, and the command line."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from support import (
    CrashAtEpochStart,
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    load,
    make_loader,
    reference_ema,
    trainer_kwargs,
)
from torch import nn

from lightning_ema import EMACallback, PostHocEMA, load_ema_state_dict
from lightning_ema.posthoc import SUPERSEDED, read_snapshot, synthesize
from lightning_ema.schedules import KarrasDecay

SIGMAS = (0.05, 0.10)


def gamma_of(sigma_rel: float) -> float:
    s = sigma_rel**-2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def karras(sigma_rel: float):  # type: ignore[no-untyped-def]
    gamma = gamma_of(sigma_rel)
    return lambda t: (1.0 - 1.0 / t) ** (gamma + 1.0)


def snapshot_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def test_snapshots_equal_a_plain_loop_with_gradient_accumulation_and_every_n_steps(tmp_path: Path) -> None:
    recorder = WeightRecorder()
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=6, every_n_steps=3, dirpath=tmp_path, file_format="torch")
    trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=[recorder, posthoc], **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader(96, 4))  # 24 batches, 12 optimizer steps per epoch
    assert trainer.global_step == 36
    assert snapshot_files(tmp_path) == [f"step-{step:010d}.pt" for step in range(6, 37, 6)]
    for step in (6, 18, 36):
        header, emas = read_snapshot(tmp_path / f"step-{step:010d}.pt")
        assert header["step"] == step and header["sigma_rels"] == list(SIGMAS)
        position = recorder.steps.index(step) + 1
        for index, sigma in enumerate(SIGMAS):
            expected = reference_ema(
                recorder.initial, recorder.steps[:position], recorder.states[:position], karras(sigma), every_n_steps=3
            )
            assert_close_to_reference(emas[index], expected)
            # integer buffers are copied, not averaged
            assert int(emas[index]["net.1.num_batches_tracked"]) == int(
                recorder.states[position - 1]["net.1.num_batches_tracked"]
            )


def relative_error(synthesised: dict, tracked: dict, raw: dict) -> float:  # type: ignore[type-arg]
    names = [n for n, t in tracked.items() if t.is_floating_point()]
    numerator = sum(float(((synthesised[n].double() - tracked[n].double()) ** 2).sum()) for n in names)
    denominator = sum(float(((tracked[n].double() - raw[n].double()) ** 2).sum()) for n in names)
    return math.sqrt(numerator / denominator)


def test_synthesis_is_close_to_an_ema_tracked_directly_in_the_same_run(tmp_path: Path) -> None:
    targets = (0.06, 0.07, 0.085)
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=8, dirpath=tmp_path)
    direct = EMACallback(decay=[KarrasDecay(sigma_rel=s) for s in targets], evaluate="raw")
    model = TinyClassifier()
    trainer = L.Trainer(max_epochs=50, callbacks=[posthoc, direct], **trainer_kwargs())
    trainer.fit(model, make_loader(64, 8))  # 400 steps, 50 snapshots
    raw = model.state_dict()
    for index, sigma in enumerate(targets):
        error = relative_error(synthesize(tmp_path, sigma), direct.ema_state_dict(index), raw)
        assert error < 0.01, (sigma, error)


def crashing_run(folder: Path, checkpoints: Path, *, max_epochs: int, crash_at: int | None) -> PostHocEMA:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=folder)
    callbacks: list[L.Callback] = [posthoc, ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1)]
    if crash_at is not None:
        callbacks.append(CrashAtEpochStart(crash_at))
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, **trainer_kwargs(enable_checkpointing=True))
    try:
        trainer.fit(TinyClassifier(), make_loader(64, 8))  # 8 steps per epoch
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    return posthoc


def test_resume_continues_the_snapshot_sequence_exactly(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    crashing_run(whole, tmp_path / "ckpt_whole", max_epochs=5, crash_at=None)
    crashing_run(resumed, tmp_path / "ckpt", max_epochs=5, crash_at=3)  # crashes after step 24, wrote up to 20
    assert snapshot_files(resumed)[-1] == "step-0000000020.safetensors"
    # the interrupted run diverged after its checkpoint at step 16: its snapshot of step 20 must not survive
    header, emas = read_snapshot(resumed / "step-0000000020.safetensors")
    from lightning_ema.posthoc import write_snapshot

    stale = [{name: torch.full_like(t, 7.0) if t.is_floating_point() else t for name, t in ema.items()} for ema in emas]
    write_snapshot(
        resumed / "step-0000000020.safetensors", step=20, sigma_rels=SIGMAS, gammas=header["gammas"], emas=stale
    )
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=16.ckpt"
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=resumed)
    trainer = L.Trainer(max_epochs=5, callbacks=[posthoc], **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader(64, 8), ckpt_path=checkpoint)

    assert snapshot_files(resumed) == snapshot_files(whole) == [f"step-{s:010d}.safetensors" for s in range(5, 41, 5)]
    assert snapshot_files(resumed / SUPERSEDED) == ["step-0000000020.safetensors"]
    for name in snapshot_files(whole):
        _, expected = read_snapshot(whole / name)
        _, actual = read_snapshot(resumed / name)
        for index in range(2):
            for key, tensor in expected[index].items():
                assert torch.equal(actual[index][key], tensor), (name, index, key)
    assert posthoc.last_snapshot_step == 40


def test_a_new_run_moves_an_earlier_runs_snapshots_aside(tmp_path: Path) -> None:
    for run in range(2):
        posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=tmp_path)
        trainer = L.Trainer(max_steps=10, callbacks=[posthoc], **trainer_kwargs())
        if run == 0:
            trainer.fit(TinyClassifier(), make_loader(64, 8))
            continue
        with pytest.warns(UserWarning, match=r"moved 2 snapshot files of steps after 0 .* earlier run"):
            trainer.fit(TinyClassifier(), make_loader(64, 8))
    assert len(snapshot_files(tmp_path)) == 2
    assert len(snapshot_files(tmp_path / SUPERSEDED)) == 2


def test_a_second_restart_keeps_the_snapshots_the_first_one_moved_aside(tmp_path: Path) -> None:
    moved_first: dict[str, bytes] = {}
    for run in range(3):
        posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=tmp_path)
        trainer = L.Trainer(max_steps=10, callbacks=[posthoc], **trainer_kwargs())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(run)  # each run's snapshots differ
            trainer.fit(TinyClassifier(lr=0.1 * (run + 1)), make_loader(64, 8))
        if run == 1:
            moved_first = {path.name: path.read_bytes() for path in (tmp_path / SUPERSEDED).iterdir()}
    aside = sorted((tmp_path / SUPERSEDED).iterdir())
    assert len(aside) == 4  # two from each earlier run: nothing overwritten
    assert all(path.read_bytes() == moved_first[path.name] for path in aside if path.name in moved_first)
    assert len(snapshot_files(tmp_path)) == 2


def test_checkpoints_hold_the_tracked_emas_and_the_snapshot_position(tmp_path: Path) -> None:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=tmp_path / "snapshots")
    trainer = L.Trainer(max_steps=12, callbacks=[posthoc], **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader(64, 8))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = load(tmp_path / "last.ckpt")["callbacks"][posthoc.state_key]
    assert state["posthoc"] == {"sigma_rels": [0.05, 0.1], "snapshot_every_n_steps": 5, "last_snapshot_step": 10}
    weights = load_ema_state_dict(tmp_path / "last.ckpt", index=1)
    for name, tensor in posthoc.ema_state_dict(1).items():
        assert torch.equal(weights[name], tensor), name
    # resuming with other widths would continue those EMAs with other decays: refused
    other = PostHocEMA((0.05, 0.2), snapshot_every_n_steps=5, dirpath=tmp_path / "snapshots")
    other_trainer = L.Trainer(max_steps=20, callbacks=[other], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"tracked sigma_rels=\[0.05, 0.1\]"):
        state_only = dict(state)
        other.load_state_dict(state_only)
    del other_trainer


def test_the_snapshot_folder_defaults_under_default_root_dir_and_float16_halves_it(tmp_path: Path) -> None:
    posthoc = PostHocEMA(0.1, snapshot_every_n_steps=4, snapshot_dtype="float16", file_format="torch")
    trainer = L.Trainer(max_steps=8, default_root_dir=tmp_path, callbacks=[posthoc], **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader(64, 8))
    assert posthoc.dirpath == str(tmp_path / "posthoc_ema")
    state = torch.load(tmp_path / "posthoc_ema" / "step-0000000008.pt", weights_only=True)
    assert state["emas"][0]["net.0.weight"].dtype == torch.float16
    assert state["emas"][0]["net.1.num_batches_tracked"].dtype == torch.int64
    assert synthesize(tmp_path / "posthoc_ema", 0.1)["net.0.weight"].dtype == torch.float32


class Scored(TinyClassifier):
    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self._record("validate", batch_idx)
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))
        self.log("val_weight_sum", self.net[0].weight.sum())


def test_sweep_validates_each_synthesised_ema_and_logs_per_sigma_rel(tmp_path: Path) -> None:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=8, dirpath=tmp_path / "snapshots")
    model = Scored()
    trainer = L.Trainer(max_steps=80, callbacks=[posthoc], **trainer_kwargs(logger=CSVLogger(tmp_path, name="logs")))
    trainer.fit(model, make_loader(64, 8), make_loader(32, 32, seed=1))
    raw = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    results = posthoc.sweep(trainer, model, [0.1, 0.03, 0.07], dataloaders=make_loader(32, 32, seed=1))
    assert list(results) == [0.03, 0.07, 0.1]
    for sigma, metrics in results.items():
        weights = synthesize(tmp_path / "snapshots", sigma)
        reference = TinyClassifier()
        reference.load_state_dict({**raw, **weights})
        reference.eval()
        x, y = make_loader(32, 32, seed=1).dataset.tensors
        with torch.no_grad():
            expected = float(nn.functional.cross_entropy(reference(x), y))
        assert metrics["val_loss"] == pytest.approx(expected, rel=1e-5), sigma
        assert metrics["val_weight_sum"] == pytest.approx(float(weights["net.0.weight"].sum()), rel=1e-5)
        assert 0 <= metrics["reconstruction_error"] < 0.1
    for name, tensor in model.state_dict().items():  # the raw weights are back
        assert torch.equal(tensor, raw[name]), name
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    logged = [(float(r["posthoc/sigma_rel"]), float(r["posthoc/val_loss"])) for r in rows if r.get("posthoc/sigma_rel")]
    assert logged == [(sigma, pytest.approx(results[sigma]["val_loss"])) for sigma in results]


def test_sweep_refuses_a_trainer_that_swaps_another_ema_in(tmp_path: Path) -> None:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=4, dirpath=tmp_path)
    trainer = L.Trainer(max_steps=8, callbacks=[posthoc, EMACallback(0.9)], **trainer_kwargs())
    model = TinyClassifier()
    trainer.fit(model, make_loader(64, 8))
    with pytest.raises(ValueError, match=r"`trainer` must not swap an EMA of its own in.*\['EMACallback'\]"):
        posthoc.sweep(trainer, model, [0.07], dataloaders=make_loader(32, 32))


def test_evaluate_with_one_tracked_ema(tmp_path: Path) -> None:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=4, dirpath=tmp_path, evaluate=0.1)

    class Check(L.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            self.expected = {n: t.clone() for n, t in posthoc.ema_state_dict(1).items()}

    check = Check()
    model = TinyClassifier()
    trainer = L.Trainer(max_steps=16, val_check_interval=8, callbacks=[posthoc, check], **trainer_kwargs())
    trainer.fit(model, make_loader(64, 8), make_loader(16, 16))
    seen = model.seen_in["validate"][-1]
    for name, tensor in check.expected.items():
        assert torch.equal(seen[name], tensor), name
    raw = model.state_dict()
    assert not torch.equal(raw["net.0.weight"], posthoc.ema_state_dict(1)["net.0.weight"])
    # a second callback swapping its EMA in is refused
    swapping = PostHocEMA(SIGMAS, snapshot_every_n_steps=4, evaluate=0.05, dirpath=tmp_path / "b")
    trainer = L.Trainer(max_steps=4, callbacks=[swapping, EMACallback(0.9)], **trainer_kwargs())
    with pytest.raises(ValueError, match="swaps cannot nest"):
        trainer.fit(TinyClassifier(), make_loader(64, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma_rels": ()}, "`sigma_rels` must be a float or a non-empty list"),
        ({"sigma_rels": (0.05, 0.05)}, "a value repeats"),
        ({"sigma_rels": (0.05, 0.4)}, r"`sigma_rel` must be a float in \(0, sqrt\(1/12\)\].*got 0.4"),
        ({"snapshot_every_n_steps": 0}, "`snapshot_every_n_steps` must be an integer >= 1, got 0"),
        ({"snapshot_every_n_steps": 10, "every_n_steps": 3}, "must be a multiple of every_n_steps=3, got 10"),
        ({"evaluate": 0.07}, r"`evaluate` must be 'raw', 'ema', 'both' or one of sigma_rels=\[0.05, 0.1\], got 0.07"),
        ({"file_format": "zip"}, "`file_format` must be one of"),
        ({"snapshot_dtype": "int8"}, "`snapshot_dtype` must be None or a floating-point dtype"),
        ({"dirpath": 3}, "`dirpath` must be None or a path, got 3"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    arguments = {"sigma_rels": SIGMAS, "snapshot_every_n_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        PostHocEMA(**arguments)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_ema", "posthoc", *args], capture_output=True, text=True)


def test_command_line_writes_one_file_per_sigma_rel(tmp_path: Path) -> None:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=tmp_path / "snapshots")
    L.Trainer(max_steps=40, callbacks=[posthoc], **trainer_kwargs()).fit(TinyClassifier(), make_loader(64, 8))
    folder = str(tmp_path / "snapshots")
    single = run_cli(folder, "--sigma-rel", "0.07", str(tmp_path / "ema.pt"))
    assert single.returncode == 0, single.stderr
    weights = torch.load(tmp_path / "ema.pt", weights_only=True)
    for name, tensor in synthesize(folder, 0.07).items():
        assert torch.equal(weights[name], tensor), name
    # options between the widths and OUT, or the widths first, parse the same
    reordered = run_cli("--sigma-rel", "0.07", folder, "--max-error", "0.2", str(tmp_path / "again.pt"))
    assert reordered.returncode == 0, reordered.stderr
    assert torch.equal(torch.load(tmp_path / "again.pt", weights_only=True)["net.0.weight"], weights["net.0.weight"])
    several = run_cli(folder, "--sigma-rel", "0.04", "0.05", "0.1", str(tmp_path / "ema.safetensors"), "--step", "35")
    assert several.returncode == 0, several.stderr
    assert several.stdout.count("wrote") == 3 and "at step 35" in several.stdout
    from safetensors.torch import load_file

    for text in ("0.04", "0.05", "0.1"):
        written = load_file(str(tmp_path / f"ema-sigma{text}.safetensors"))
        for name, tensor in synthesize(folder, float(text), step=35).items():
            assert torch.equal(written[name], tensor), (text, name)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sigma-rel", "0.6"], "`sigma_rel` must be a float in (0, sqrt(1/12)]"),
        (["--sigma-rel", "0.07", "--step", "7"], "`step` must be the step of a snapshot"),
        (["--sigma-rel", "0.003"], "`sigma_rel` must be one the snapshots can reconstruct"),
    ],
)
def test_command_line_errors_are_one_line_and_exit_code_2(tmp_path: Path, args: list[str], message: str) -> None:
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=5, dirpath=tmp_path / "snapshots")
    L.Trainer(max_steps=10, callbacks=[posthoc], **trainer_kwargs()).fit(TinyClassifier(), make_loader(64, 8))
    result = run_cli(str(tmp_path / "snapshots"), *args, str(tmp_path / "out.pt"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out.pt").exists()
    missing = run_cli(str(tmp_path / "nowhere"), "--sigma-rel", "0.07", str(tmp_path / "out.pt"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
