"""Entry points real users drive a Trainer through, checked against the files on disk and a plain-loop reference.

Each test is a defect found by driving ``EMACallback`` the way users do (or a guard for a path no other test
covers): a ``fit`` resumed from the checkpoint of a finished run, checkpoints that hold no EMA evaluated on the
fitted module, ``StochasticWeightAveraging`` placed after the EMA callback, and a resume from the middle of an
epoch. Expected values come from the checkpoint files themselves (read with ``torch.load``) or from
``reference_ema``, a float64 loop over the weights recorded after each optimizer step.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from support import (
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    constant_decay,
    load,
    make_data,
    make_loader,
    reference_ema,
    snapshot,
    trainer_kwargs,
)
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_ema import EMACallback

DECAY = 0.9


def assert_equal_states(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Every tensor of ``expected`` is in ``actual`` and equal to it bit for bit."""
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def saved_ema(path: Path) -> dict[str, Tensor]:
    """The first EMA of the single EMA state of a checkpoint file."""
    (state,) = [s for s in load(path)["callbacks"].values() if isinstance(s, dict) and s.get("format")]
    return state["emas"][0]


def ema_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "EMA" in str(w.message)]


# ---------------------------------------------------------------------------------------------- a finished run
def test_fit_resumed_from_a_finished_run_holds_the_checkpoints_ema(tmp_path: Path) -> None:
    first = L.Trainer(
        callbacks=[EMACallback(decay=DECAY), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        max_epochs=2,
        **trainer_kwargs(enable_checkpointing=True),
    )
    first.fit(TinyClassifier(), make_loader())
    last = tmp_path / "last.ckpt"

    # Rerunning the script (same max_epochs, ckpt_path="last"): Lightning takes no step and runs no train hook.
    callback, model = EMACallback(decay=DECAY), TinyClassifier()
    trainer = L.Trainer(callbacks=[callback], max_epochs=2, **trainer_kwargs())
    trainer.fit(model, make_loader(), ckpt_path=last)
    assert trainer.global_step == load(last)["global_step"]
    assert_equal_states(callback.ema_state_dict(), saved_ema(last))
    assert callback.num_updates == trainer.global_step
    with callback.swapped(model):
        assert_equal_states(snapshot(model), saved_ema(last))
    assert_equal_states(snapshot(model), load(last)["state_dict"])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, make_loader(16, seed=2))
    assert ema_messages(caught) == []
    assert_equal_states(model.seen_in["test"][0], saved_ema(last))


# ---------------------------------------------------------------------------------------------- no EMA in the file
def test_a_weights_only_best_checkpoint_tested_on_the_fitted_module_evaluates_its_raw_weights(
    tmp_path: Path,
) -> None:
    callback, model = EMACallback(decay=DECAY), TinyClassifier()
    # mode="max" on a falling loss: the best checkpoint is the first epoch's, not the end of `fit`
    best = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, monitor="val_loss", mode="max")
    trainer = L.Trainer(callbacks=[callback, best], max_epochs=3, **trainer_kwargs(enable_checkpointing=True))
    trainer.fit(model, make_loader(), make_loader(16, seed=1))
    saved = load(best.best_model_path)
    assert "callbacks" not in saved and saved["global_step"] < trainer.global_step

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, make_loader(16, seed=2), ckpt_path="best")
    # the best checkpoint's raw weights, not the EMA that `fit` ended with
    assert_equal_states(model.seen_in["test"][0], saved["state_dict"])
    (message,) = ema_messages(caught)
    assert "weights-only" in message and "raw weights are evaluated" in message


def test_a_checkpoint_without_ema_tested_on_the_fitted_module_evaluates_its_raw_weights(tmp_path: Path) -> None:
    plain = L.Trainer(max_epochs=1, **trainer_kwargs())
    plain.fit(TinyClassifier(lr=0.05), make_loader())
    plain.save_checkpoint(tmp_path / "plain.ckpt")

    callback, model = EMACallback(decay=DECAY), TinyClassifier()
    trainer = L.Trainer(callbacks=[callback], max_epochs=2, **trainer_kwargs())
    trainer.fit(model, make_loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.test(model, make_loader(16, seed=2), ckpt_path=tmp_path / "plain.ckpt")
    assert_equal_states(model.seen_in["test"][0], load(tmp_path / "plain.ckpt")["state_dict"])
    (message,) = ema_messages(caught)
    assert "holds no EMA state" in message and "raw weights are evaluated" in message


# ---------------------------------------------------------------------------------------------- SWA
@pytest.mark.parametrize("order", ["ema-before-swa", "swa-before-ema"])
def test_swa_batchnorm_statistics_are_averaged_whatever_the_callback_order(order: str) -> None:
    recorder, callback = WeightRecorder(), EMACallback(decay=DECAY)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    callbacks: list[L.Callback] = [recorder, callback, swa] if order == "ema-before-swa" else [recorder, swa, callback]
    trainer = L.Trainer(callbacks=callbacks, max_epochs=4, **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader())
    assert recorder.initial is not None
    # SWA's extra epoch resets BatchNorm statistics into new tensors and takes one step: the EMA reads the new ones
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(DECAY))
    assert_close_to_reference(callback.ema_state_dict(), expected)


# ---------------------------------------------------------------------------------------------- mid-epoch resume
class ResumableLoader(DataLoader):  # type: ignore[type-arg]
    """A loader Lightning can resume mid-epoch: its state is how many batches of the epoch it has yielded."""

    def __init__(self, n: int) -> None:
        super().__init__(make_data(n), batch_size=8, shuffle=False)
        self.yielded = 0
        self.skip = 0

    def __iter__(self) -> Any:
        skip, self.skip = self.skip, 0
        self.yielded = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self.yielded += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["yielded"]


def test_a_resume_mid_epoch_and_between_updates_is_bit_exact(tmp_path: Path) -> None:
    # 9 batches an epoch, 2 per optimizer step (5 steps an epoch), an update every 3 steps, validation every 3
    # batches, and max_steps=13 not a multiple of 3: checkpoints fall mid-epoch and between updates
    settings: dict[str, Any] = dict(max_steps=13, accumulate_grad_batches=2, val_check_interval=3, limit_val_batches=2)

    def run(callbacks: list[L.Callback], ckpt_path: Path | None = None) -> tuple[EMACallback, TinyClassifier]:
        callback, model = EMACallback(decay=DECAY, every_n_steps=3), TinyClassifier()
        keeps = ckpt_path is None
        trainer = L.Trainer(callbacks=[*callbacks, callback], **settings, **trainer_kwargs(enable_checkpointing=keeps))
        trainer.fit(model, ResumableLoader(72), make_loader(16, seed=1), ckpt_path=ckpt_path)
        assert trainer.global_step == 13
        return callback, model

    recorder = WeightRecorder()
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    callback_a, model_a = run([recorder, every_step])
    assert recorder.initial is not None
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(DECAY), every_n_steps=3)
    assert_close_to_reference(callback_a.ema_state_dict(), expected)

    for step in (7, 11):  # mid-epoch; one step after an update, two steps after one
        callback_c, model_c = run([], tmp_path / f"step={step}.ckpt")
        assert callback_c.num_updates == callback_a.num_updates
        assert_equal_states(snapshot(model_c), snapshot(model_a))
        assert_equal_states(callback_c.ema_state_dict(), callback_a.ema_state_dict())
