"""Exceptions and non-finite weights never leave EMA weights in the model or in the EMA."""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch
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

from lightning_ema import EMACallback, NonFiniteUpdateError


class FailingValidation(TinyClassifier):
    def __init__(self, error: BaseException, on_validation: int = 1) -> None:
        super().__init__()
        self.error = error
        self.on_validation = on_validation

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        super().validation_step(batch, batch_idx)
        if len(self.seen_in["validate"]) == self.on_validation and batch_idx == 1:
            raise self.error


def assert_raw(model: TinyClassifier, raw: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    for name, tensor in raw.items():
        assert torch.equal(now[name], tensor), name


def test_exception_in_validation_step_restores_raw_weights() -> None:
    model = FailingValidation(RuntimeError("boom"), on_validation=2)
    callback = EMACallback(decay=0.7)
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, callback], max_epochs=3, **trainer_kwargs())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, make_loader(), make_loader(n=16))
    assert_raw(model, recorder.states[-1])
    # the EMA survived as well: it equals the reference at the failing validation
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(0.7))
    assert_close_to_reference(callback.ema_state_dict(), expected)


def test_exception_in_another_callback_during_validation_restores_raw_weights() -> None:
    class Crash(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
            raise ValueError("user callback failed")

    model = TinyClassifier()
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, EMACallback(decay=0.7), Crash()], max_epochs=2, **trainer_kwargs())
    with pytest.raises(ValueError, match="user callback failed"):
        trainer.fit(model, make_loader(), make_loader(n=16))
    assert_raw(model, recorder.states[-1])


def test_keyboard_interrupt_during_test_restores_raw_weights() -> None:
    model = TinyClassifier()
    callback = EMACallback(decay=0.7)
    trainer = L.Trainer(callbacks=[callback], max_epochs=1, **trainer_kwargs())
    trainer.fit(model, make_loader())
    raw = snapshot(model)

    class Interrupting(L.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    trainer = L.Trainer(callbacks=[callback, Interrupting()], **trainer_kwargs())
    try:
        # Lightning turns a KeyboardInterrupt into a graceful shutdown that ends with sys.exit(1)
        with pytest.raises(SystemExit):
            trainer.test(model, make_loader(n=16), verbose=False)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert_raw(model, raw)


def test_swapped_context_restores_raw_weights_on_exception() -> None:
    model = TinyClassifier()
    callback = EMACallback(decay=0.5)
    L.Trainer(callbacks=[callback], max_epochs=1, **trainer_kwargs()).fit(model, make_loader())
    raw = snapshot(model)
    ema = {name: tensor.clone() for name, tensor in callback.ema_state_dict().items()}
    with pytest.raises(ZeroDivisionError), callback.swapped(model) as swapped:
        assert swapped is model
        for name, tensor in snapshot(model).items():
            assert torch.equal(tensor, ema[name]), name
        _ = 1 / 0
    assert_raw(model, raw)


class PoisonWeights(L.Callback):
    """Before the EMACallback: writes a NaN into one weight after optimizer step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.net[3].bias[0] = float("nan")


def test_nonfinite_weight_is_refused_with_an_error_and_the_ema_stays_finite() -> None:
    callback = EMACallback(decay=0.7)
    recorder = WeightRecorder()
    trainer = L.Trainer(callbacks=[recorder, PoisonWeights(5), callback], max_epochs=2, **trainer_kwargs())
    with pytest.raises(NonFiniteUpdateError, match=r"net\.3\.bias.*step 5.*nonfinite='skip'"):
        trainer.fit(TinyClassifier(), make_loader())
    ema = callback.ema_state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in ema.values() if tensor.is_floating_point())
    assert callback.num_updates == 4
    expected = reference_ema(recorder.initial, recorder.steps[:4], recorder.states[:4], constant_decay(0.7))
    assert_close_to_reference(ema, expected)


def test_nonfinite_weight_is_skipped_with_a_warning_when_asked() -> None:
    class Heal(L.Callback):
        """After the poisoned step, the next optimizer step overwrites the NaN again (as training would not)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            with torch.no_grad():
                bias = pl_module.net[3].bias
                bias.copy_(torch.nan_to_num(bias, nan=0.0))

    callback = EMACallback(decay=0.7, nonfinite="skip")
    trainer = L.Trainer(callbacks=[Heal(), PoisonWeights(5), callback], max_epochs=1, **trainer_kwargs())
    with pytest.warns(RuntimeWarning, match=r"net\.3\.bias.*step 5.*skipped"):
        trainer.fit(TinyClassifier(), make_loader())
    assert callback.num_updates == 7
    ema = callback.ema_state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in ema.values() if tensor.is_floating_point())
