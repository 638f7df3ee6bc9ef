"""evaluate="both": raw and EMA weights validated in one run, each with its own torchmetrics state."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import TinyClassifier, make_loader, snapshot, trainer_kwargs
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ema import EMACallback


class WithAccuracy(TinyClassifier):
    """Logs a torchmetrics Accuracy object (not a tensor) and a loss; records weights seen per pass."""

    def __init__(self) -> None:
        super().__init__(lr=0.5)
        self.val_acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.history: list[dict[str, float]] = []

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def on_validation_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        self.history.append({k: float(v) for k, v in metrics.items() if k.startswith("val_")})


@torch.no_grad()
def independent_accuracy(state: dict[str, torch.Tensor], loader) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Accuracy and mean loss of a fresh model holding ``state``, computed by hand."""
    model = TinyClassifier()
    model.load_state_dict(state)
    model.eval()
    correct = total = 0
    losses = []
    for x, y in loader:
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
        losses.append(nn.functional.cross_entropy(logits, y))
    return correct / total, float(torch.stack(losses).mean())


class CaptureStates(L.Callback):
    """Before the EMACallback: raw weights and the EMA at every validation start."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.raw: list[dict[str, torch.Tensor]] = []
        self.averaged: list[dict[str, torch.Tensor]] = []

    def on_validation_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.raw.append(snapshot(pl_module))
        if trainer.global_step:
            ema = {k: v.clone() for k, v in self.ema.ema_state_dict().items()}
            self.averaged.append({**snapshot(pl_module), **ema})


def test_raw_and_ema_metrics_equal_separate_evaluations() -> None:
    ema = EMACallback(decay=0.8, evaluate="both")
    capture = CaptureStates(ema)
    model = WithAccuracy()
    val_loader = make_loader(n=48, seed=1)
    trainer = L.Trainer(callbacks=[capture, ema], max_epochs=3, **trainer_kwargs())
    trainer.fit(model, make_loader(), val_loader)
    assert len(model.history) == 3
    for logged, raw, averaged in zip(model.history, capture.raw, capture.averaged, strict=True):
        raw_acc, raw_loss = independent_accuracy(raw, val_loader)
        ema_acc, ema_loss = independent_accuracy(averaged, val_loader)
        assert logged["val_acc"] == pytest.approx(raw_acc, abs=1e-6)
        assert logged["val_acc_ema"] == pytest.approx(ema_acc, abs=1e-6)
        assert logged["val_loss"] == pytest.approx(raw_loss, rel=1e-5)
        assert logged["val_loss_ema"] == pytest.approx(ema_loss, rel=1e-5)
    # the two passes really differ, so equality above is not a coincidence
    assert any(h["val_loss"] != h["val_loss_ema"] for h in model.history)
    assert {"val_acc", "val_acc_ema"} <= set(trainer.progress_bar_metrics)
    # training continued from raw weights and the step method is the class's again
    assert "validation_step" not in model.__dict__


def test_model_checkpoint_monitors_the_ema_metric(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ema = EMACallback(decay=0.8, evaluate="both")
    capture = CaptureStates(ema)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss_ema", mode="min", save_top_k=1)
    model = WithAccuracy()
    val_loader = make_loader(n=48, seed=1)
    trainer = L.Trainer(callbacks=[capture, ema, checkpoint], max_epochs=4, **trainer_kwargs(enable_checkpointing=True))
    trainer.fit(model, make_loader(), val_loader)
    ema_losses = [independent_accuracy(state, val_loader)[1] for state in capture.averaged]
    best_epoch = min(range(len(ema_losses)), key=ema_losses.__getitem__)
    assert checkpoint.best_model_path.endswith(f"epoch={best_epoch}-step={8 * (best_epoch + 1)}.ckpt")
    assert float(checkpoint.best_model_score) == pytest.approx(ema_losses[best_epoch], rel=1e-5)


def test_test_runs_both_passes_with_a_custom_suffix() -> None:
    ema = EMACallback(decay=0.8, evaluate="both", suffix="/ema")
    model = WithAccuracy()
    trainer = L.Trainer(callbacks=[ema], max_epochs=1, **trainer_kwargs())
    trainer.fit(model, make_loader())
    raw = snapshot(model)
    averaged = {**raw, **{k: v.clone() for k, v in ema.ema_state_dict().items()}}
    loader = make_loader(n=48, seed=2)
    (results,) = trainer.test(model, loader, verbose=False)
    assert results["test_acc"] == pytest.approx(independent_accuracy(raw, loader)[0], abs=1e-6)
    assert results["test_acc/ema"] == pytest.approx(independent_accuracy(averaged, loader)[0], abs=1e-6)
    for name, tensor in snapshot(model).items():
        assert torch.equal(tensor, raw[name]), name


def test_exception_in_the_ema_pass_restores_weights_and_step() -> None:
    class FailsOnSecondPass(WithAccuracy):
        calls = 0

        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            type(self).calls += 1
            if type(self).calls == 2:
                raise RuntimeError("fails inside the EMA pass")
            return super().validation_step(batch, batch_idx)

    ema = EMACallback(decay=0.8, evaluate="both")
    model = FailsOnSecondPass()
    trainer = L.Trainer(callbacks=[ema], max_epochs=1, **trainer_kwargs())
    trainer.fit(model, make_loader())  # validation runs after fit here: no val loader yet
    raw = snapshot(model)
    accuracy = model.val_acc
    with pytest.raises(RuntimeError, match="EMA pass"):
        trainer.validate(model, make_loader(n=16), verbose=False)
    for name, tensor in snapshot(model).items():
        assert torch.equal(tensor, raw[name]), name
    assert "validation_step" not in model.__dict__ and "log" not in model.__dict__
    assert model.val_acc is accuracy
