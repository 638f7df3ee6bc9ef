"""Several decays in one EMACallback: values, evaluation, logs, resume, old checkpoints and export."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from support import (
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    constant_decay,
    make_loader,
    reference_ema,
    snapshot,
    trainer_kwargs,
)
from test_evaluate_both import WithAccuracy, independent_accuracy

from lightning_ema import EMACallback, load_ema_state_dict

DECAYS = [0.9, 0.99]


def test_each_ema_equals_its_plain_loop_reference() -> None:
    callback = EMACallback(decay=DECAYS, every_n_steps=2, start_step=3)
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, callback], max_epochs=3, **trainer_kwargs(accumulate_grad_batches=2))
    trainer.fit(TinyClassifier(), make_loader())
    assert callback.num_updates == trainer.global_step // 2
    for index, decay in enumerate(DECAYS):
        expected = reference_ema(
            recorder.initial,
            recorder.steps,
            recorder.states,
            constant_decay(decay),
            every_n_steps=2,
            start_step=3,
        )
        assert_close_to_reference(callback.ema_state_dict(index), expected)


@pytest.mark.parametrize("evaluate", ["ema", "both"])
def test_every_ema_is_evaluated_under_its_own_suffix(evaluate: str) -> None:
    capture_by_index = []
    callback = EMACallback(decay=DECAYS, evaluate=evaluate)

    class Capture(L.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            raw = snapshot(pl_module)
            capture_by_index.append(
                [raw] + [{**raw, **{k: v.clone() for k, v in callback.ema_state_dict(i).items()}} for i in (0, 1)]
            )

    model = WithAccuracy()
    loader = make_loader(n=48, seed=1)
    trainer = L.Trainer(callbacks=[Capture(), callback], max_epochs=2, **trainer_kwargs())
    trainer.fit(model, make_loader(), loader)
    logged = model.history[-1]
    raw, first, second = capture_by_index[-1]
    assert logged["val_acc_ema0.9"] == pytest.approx(independent_accuracy(first, loader)[0], abs=1e-6)
    assert logged["val_acc_ema0.99"] == pytest.approx(independent_accuracy(second, loader)[0], abs=1e-6)
    assert logged["val_loss_ema0.9"] == pytest.approx(independent_accuracy(first, loader)[1], rel=1e-5)
    if evaluate == "both":
        assert logged["val_loss"] == pytest.approx(independent_accuracy(raw, loader)[1], rel=1e-5)
    else:
        assert "val_loss" not in logged
    # the last validation ends the run: the model must hold exactly the raw weights it had before it
    for name, tensor in snapshot(model).items():
        assert torch.equal(tensor, raw[name]), name


def test_decays_and_distances_are_logged_per_ema(tmp_path: Path) -> None:
    callback = EMACallback(decay=DECAYS, distance_every_n_steps=4)
    recorder = WeightRecorder()
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        callbacks=[recorder, callback], max_epochs=1, **trainer_kwargs(logger=logger, log_every_n_steps=1)
    )
    trainer.fit(TinyClassifier(), make_loader())
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    for decay in DECAYS:
        values = [float(row[f"ema/decay/{decay}"]) for row in rows if row.get(f"ema/decay/{decay}")]
        assert len(values) == 8 and all(value == pytest.approx(decay) for value in values)
    # the distance after step 8, against the closed form over recorded weights and the reference EMA
    names = [name for name, _ in TinyClassifier().named_parameters()] + ["net.1.running_mean", "net.1.running_var"]
    position = recorder.steps.index(8) + 1
    weights = recorder.states[position - 1]
    for decay in DECAYS:
        ema = reference_ema(
            recorder.initial, recorder.steps[:position], recorder.states[:position], constant_decay(decay)
        )
        numerator = math.sqrt(sum(float(((ema[n] - weights[n].double()) ** 2).sum()) for n in names))
        denominator = math.sqrt(sum(float((weights[n].double() ** 2).sum()) for n in names))
        (row,) = [row for row in rows if row.get(f"ema/distance/{decay}") and int(row["step"]) == 7]
        assert float(row[f"ema/distance/{decay}"]) == pytest.approx(numerator / denominator, rel=1e-4)


def fit_to(tmp_path: Path, max_epochs: int, ckpt_path: Path | None = None) -> EMACallback:
    callback = EMACallback(decay=DECAYS, every_n_steps=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(
        callbacks=[callback, checkpoint], max_epochs=max_epochs, **trainer_kwargs(enable_checkpointing=True)
    )
    trainer.fit(TinyClassifier(), make_loader(), ckpt_path=ckpt_path)
    return callback


def test_resume_with_several_decays_is_bit_exact(tmp_path: Path) -> None:
    whole = fit_to(tmp_path / "whole", 4)
    fit_to(tmp_path / "half", 2)
    resumed = fit_to(tmp_path / "resumed", 4, ckpt_path=tmp_path / "half" / "last.ckpt")
    assert resumed.num_updates == whole.num_updates
    for index in (0, 1):
        for name, tensor in whole.ema_state_dict(index).items():
            assert torch.equal(resumed.ema_state_dict(index)[name], tensor), (index, name)


def test_checkpoint_in_the_version_1_layout_still_resumes(tmp_path: Path) -> None:
    """A single-decay checkpoint as lightning-ema wrote it before several decays existed."""

    def run(directory: Path, max_epochs: int, ckpt_path: Path | None = None) -> EMACallback:
        callback = EMACallback(decay=0.9)
        checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
        trainer = L.Trainer(
            callbacks=[callback, checkpoint], max_epochs=max_epochs, **trainer_kwargs(enable_checkpointing=True)
        )
        trainer.fit(TinyClassifier(), make_loader(), ckpt_path=ckpt_path)
        return callback

    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "half", 1)
    checkpoint = torch.load(tmp_path / "half" / "last.ckpt", weights_only=True)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("EMACallback")]
    state = checkpoint["callbacks"][key]
    config = dict(state["config"])
    config["decay"] = config.pop("decays")[0]
    checkpoint["callbacks"][key] = {
        "format": "lightning-ema",
        "version": 1,
        "config": config,
        "num_updates": state["num_updates"],
        "last_update_step": state["last_update_step"],
        "ema": state["emas"][0],
    }
    old = tmp_path / "version1.ckpt"
    torch.save(checkpoint, old)
    assert torch.equal(load_ema_state_dict(old)["net.0.weight"], state["emas"][0]["net.0.weight"])
    with pytest.warns() as record:
        resumed = run(tmp_path / "resumed", 3, ckpt_path=old)
    assert not [w for w in record if "configuration" in str(w.message) or "EMA starts" in str(w.message)]
    for name, tensor in whole.ema_state_dict().items():
        assert torch.equal(resumed.ema_state_dict()[name], tensor), name


def test_export_by_decay_and_by_index(tmp_path: Path) -> None:
    callback = fit_to(tmp_path, 1)
    last = tmp_path / "last.ckpt"
    with pytest.raises(ValueError, match="holds 2 EMAs"):
        load_ema_state_dict(last)
    by_decay = load_ema_state_dict(last, decay=0.99)
    by_index = load_ema_state_dict(last, index=1)
    for name, tensor in callback.ema_state_dict(1).items():
        assert torch.equal(by_decay[name], tensor) and torch.equal(by_index[name], tensor), name
    with pytest.raises(ValueError, match=r"`decay` must be one of"):
        load_ema_state_dict(last, decay=0.5)
    out = tmp_path / "ema.pt"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_ema", "export", str(last), str(out), "--decay", "0.9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    exported = torch.load(out, weights_only=True)
    for name, tensor in callback.ema_state_dict(0).items():
        assert torch.equal(exported[name], tensor), name
    model = TinyClassifier()
    model.load_state_dict(exported)
