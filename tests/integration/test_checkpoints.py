"""EMACallback and Lightning checkpoints on disk: saved state, exact resume, raw weights, mismatches (§4, §7).

Every expected value comes from outside the code under test: weights recorded after each optimizer step
by ``WeightRecorder`` (placed before the EMACallback), the plain-loop ``reference_ema``, or a second,
uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from support import (
    CrashAtEpochStart,
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    constant_decay,
    load,
    make_loader,
    reference_ema,
    snapshot,
    trainer_kwargs,
    warmup_decay,
)
from torch import Tensor

import lightning_ema
from lightning_ema import EMACallback, EMAStateError
from lightning_ema.schedules import WarmupDecay

STEPS_PER_EPOCH = 8  # make_loader(): 64 samples in batches of 8


# ---------------------------------------------------------------------------------------------- helpers
def run_fit(
    model: L.LightningModule,
    callbacks: list[L.Callback],
    *,
    max_epochs: int,
    ckpt_path: str | Path | None = None,
    **kwargs: object,
) -> L.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    kwargs.setdefault("enable_checkpointing", checkpointing)
    trainer = L.Trainer(callbacks=callbacks, max_epochs=max_epochs, **trainer_kwargs(**kwargs))
    trainer.fit(model, make_loader(), make_loader(n=16), ckpt_path=ckpt_path)
    return trainer


def clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def assert_equal_states(actual: dict[str, Tensor], expected: dict[str, Tensor], names=None) -> None:
    names = sorted(expected) if names is None else sorted(names)
    assert set(names) <= set(actual), sorted(set(names) - set(actual))
    for name in names:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), f"{name} differs"


def assert_differs(first: dict[str, Tensor], second: dict[str, Tensor], name: str = "net.0.weight") -> None:
    """The EMA with decay 0.9 is visibly away from the raw weights (so that equal-checks mean something)."""
    assert (first[name].double() - second[name].double()).abs().max().item() > 1e-4


def ema_entries(checkpoint: dict) -> dict[str, dict]:
    """The lightning-ema states of a checkpoint, found by their documented layout (not via the package)."""
    return {
        key: state
        for key, state in checkpoint.get("callbacks", {}).items()
        if isinstance(state, dict) and state.get("format") == "lightning-ema"
    }


def raw_at(recorder: WeightRecorder, step: int) -> dict[str, Tensor]:
    return recorder.states[recorder.steps.index(step)]


def reference_at(recorder: WeightRecorder, step: int, decay_at, **kwargs) -> dict[str, Tensor]:
    upto = recorder.steps.index(step) + 1
    return reference_ema(recorder.initial, recorder.steps[:upto], recorder.states[:upto], decay_at, **kwargs)


def crash_after_two_epochs(tmp_path: Path, callbacks: list[L.Callback], **kwargs: object) -> Path:
    """Fit with a ModelCheckpoint and crash at the start of epoch 2; return ``last.ckpt``."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=-1, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fit(TinyClassifier(), [*callbacks, checkpoint, CrashAtEpochStart(2)], max_epochs=4, **kwargs)
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_file()
    return last


# ---------------------------------------------------------------------------------------------- 1. saved state
def test_callback_state_in_checkpoint_is_plain_and_matches_reference(tmp_path: Path) -> None:
    recorder, callback = WeightRecorder(), EMACallback(decay=0.9)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model = TinyClassifier()
    run_fit(model, [recorder, callback, saver], max_epochs=2)

    paths = sorted(tmp_path.glob("epoch=*.ckpt"))
    assert [p.name for p in paths] == ["epoch=0.ckpt", "epoch=1.ckpt"]
    for path in paths:
        checkpoint = load(path)  # weights_only=True: only tensors and plain values
        state = checkpoint["callbacks"][callback.state_key]
        step = checkpoint["global_step"]
        assert step in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)

        assert state["format"] == "lightning-ema"
        assert state["version"] == 2
        config = state["config"]
        assert isinstance(config, dict)
        assert config["every_n_steps"] == 1
        assert config["start_step"] == 0
        assert config["decays"] == ["ConstantDecay(decay=0.9)"]
        assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in config.values()), config
        assert state["num_updates"] == step
        assert state["last_update_step"] == step

        ema = state["emas"][0]
        assert set(ema) == set(model.state_dict())  # keyed by the LightningModule's state_dict names
        assert all(isinstance(t, Tensor) for t in ema.values())
        assert ema["net.0.weight"].dtype == torch.float32
        assert_close_to_reference(ema, reference_at(recorder, step, constant_decay(0.9)))
        # integer buffers are copied
        assert torch.equal(ema["net.1.num_batches_tracked"], raw_at(recorder, step)["net.1.num_batches_tracked"])
        assert_differs(ema, checkpoint["state_dict"])


# ---------------------------------------------------------------------------------------------- 2. exact resume
RESUME_CASES = {
    "constant": (lambda: EMACallback(decay=0.9), {}, dict(decay_at=constant_decay(0.9))),
    "every3-accumulate2-start5": (
        lambda: EMACallback(decay=0.9, every_n_steps=3, start_step=5),
        {"accumulate_grad_batches": 2},
        dict(decay_at=constant_decay(0.9), every_n_steps=3, start_step=5),
    ),
    "warmup-schedule": (
        lambda: EMACallback(decay=WarmupDecay(decay=0.99, warmup=10)),
        {},
        dict(decay_at=warmup_decay(0.99, 10)),
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_crash_and_resume_is_bit_exact(tmp_path: Path, case: str) -> None:
    make_callback, kwargs, reference = RESUME_CASES[case]
    steps_per_epoch = STEPS_PER_EPOCH // kwargs.get("accumulate_grad_batches", 1)

    # A: uninterrupted
    recorder, callback_a, model_a = WeightRecorder(), make_callback(), TinyClassifier()
    trainer_a = run_fit(model_a, [recorder, callback_a], max_epochs=4, **kwargs)
    assert trainer_a.global_step == 4 * steps_per_epoch
    ema_a = clone(callback_a.ema_state_dict())
    raw_a = snapshot(model_a)
    reference = dict(reference)
    decay_at = reference.pop("decay_at")
    assert_close_to_reference(
        ema_a, reference_ema(recorder.initial, recorder.steps, recorder.states, decay_at, **reference)
    )
    assert_differs(ema_a, raw_a)

    # B: crash when epoch 2 starts, after two full epochs
    last = crash_after_two_epochs(tmp_path, [make_callback()], **kwargs)
    saved = load(last)
    assert saved["global_step"] == 2 * steps_per_epoch
    saved_state = ema_entries(saved)
    assert len(saved_state) == 1
    saved_state = next(iter(saved_state.values()))
    if case.startswith("every3"):
        # the checkpoint falls between two updates: last update at step 6, checkpoint at step 8
        assert saved_state["last_update_step"] == 6 and saved["global_step"] == 8

    # C: fresh Trainer, model and callback resume from last.ckpt
    callback_c, model_c = make_callback(), TinyClassifier()
    trainer_c = run_fit(model_c, [callback_c], max_epochs=4, ckpt_path=last, num_sanity_val_steps=1, **kwargs)
    assert trainer_c.global_step == 4 * steps_per_epoch

    # the sanity-check validation already ran with the checkpoint's EMA, not with its raw weights
    seen = model_c.seen_in["validate"][0]
    assert_equal_states(seen, saved_state["emas"][0])
    assert_differs(seen, saved["state_dict"])

    assert callback_c.num_updates == callback_a.num_updates
    assert_equal_states(callback_c.ema_state_dict(), ema_a)
    assert set(callback_c.ema_state_dict()) == set(ema_a)
    assert_equal_states(snapshot(model_c), raw_a)

    # what both runs would save now is the same, counters included
    trainer_a.save_checkpoint(tmp_path / "a.ckpt")
    trainer_c.save_checkpoint(tmp_path / "c.ckpt")
    final_a, final_c = load(tmp_path / "a.ckpt"), load(tmp_path / "c.ckpt")
    state_a, state_c = (final["callbacks"][callback_a.state_key] for final in (final_a, final_c))
    for key in ("format", "version", "config", "num_updates", "last_update_step"):
        assert state_c[key] == state_a[key], key
    assert_equal_states(state_c["emas"][0], state_a["emas"][0])
    assert_equal_states(final_c["state_dict"], final_a["state_dict"])


# ---------------------------------------------------------------------------------------------- 3. raw weights
class SaveDuringValidation(L.Callback):
    """A user callback that saves a checkpoint while validation runs (EMA swapped in)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.directory / f"during-val-step={trainer.global_step}.ckpt")


@pytest.mark.parametrize(
    "how",
    ["monitor-val-loss", "train-epoch-end", "user-callback-during-validation"],
)
def test_checkpoint_state_dict_holds_raw_weights(tmp_path: Path, how: str) -> None:
    recorder, callback = WeightRecorder(), EMACallback(decay=0.9)
    callbacks: list[L.Callback] = [recorder, callback]
    if how == "monitor-val-loss":
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{step}"))
    elif how == "train-epoch-end":
        callbacks.append(
            ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True, save_top_k=-1, filename="{step}")
        )
    else:
        callbacks.append(SaveDuringValidation(tmp_path))
    model = TinyClassifier()
    run_fit(model, callbacks, max_epochs=2)

    paths = sorted(tmp_path.glob("*.ckpt"))
    assert len(paths) == 2, paths
    for path in paths:
        checkpoint = load(path)
        step = checkpoint["global_step"]
        raw = raw_at(recorder, step)
        assert_equal_states(checkpoint["state_dict"], raw)
        assert set(checkpoint["state_dict"]) == set(raw)
        ema = checkpoint["callbacks"][callback.state_key]["emas"][0]
        assert_close_to_reference(ema, reference_at(recorder, step, constant_decay(0.9)))
        assert_differs(ema, checkpoint["state_dict"])
    if how == "user-callback-during-validation":
        # validation really ran with the EMA while these checkpoints were written
        assert_differs(model.seen_in["validate"][-1], recorder.states[-1])


def test_save_checkpoint_inside_swapped_keeps_raw_weights(tmp_path: Path) -> None:
    recorder, callback, model = WeightRecorder(), EMACallback(decay=0.9), TinyClassifier()
    trainer = run_fit(model, [recorder, callback], max_epochs=2)
    raw = snapshot(model)
    assert_equal_states(raw, recorder.states[-1])
    ema = clone(callback.ema_state_dict())

    with callback.swapped(model):
        inside = snapshot(model)
        trainer.save_checkpoint(tmp_path / "swapped.ckpt")
    assert_equal_states(inside, ema)  # the EMA really was in the module
    assert_differs(inside, raw)
    assert_equal_states(snapshot(model), raw)  # and the raw weights came back

    checkpoint = load(tmp_path / "swapped.ckpt")
    assert_equal_states(checkpoint["state_dict"], raw)
    assert_equal_states(checkpoint["callbacks"][callback.state_key]["emas"][0], ema)
    assert_close_to_reference(
        checkpoint["callbacks"][callback.state_key]["emas"][0],
        reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(0.9)),
    )


class FailsInSecondValidation(TinyClassifier):
    error: type[BaseException] = RuntimeError  # set on the instance, not via hparams (kept weights_only-loadable)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if len(self.seen_in["validate"]) == 2:
            raise self.error("validation failed")


@pytest.mark.parametrize("evaluate", ["ema", "both"])
@pytest.mark.parametrize(
    ("error", "expected"),
    [(RuntimeError, RuntimeError), (KeyboardInterrupt, SystemExit)],  # Lightning exits(1) after Ctrl-C
    ids=["RuntimeError", "KeyboardInterrupt"],
)
def test_on_exception_checkpoint_during_validation_holds_raw_weights(
    tmp_path: Path, error, expected, evaluate: str
) -> None:
    recorder, callback, model = WeightRecorder(), EMACallback(decay=0.9, evaluate=evaluate), FailsInSecondValidation()
    model.error = error
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path)
    with pytest.raises(expected):
        run_fit(model, [recorder, callback, on_exception], max_epochs=3, enable_checkpointing=True)

    # The second first-batch validation_step raised while the EMA was in the model: with "ema" that is the
    # validation after epoch 1 (step 16), with "both" the EMA pass of the validation after epoch 0 (step 8).
    step = recorder.steps[-1]
    assert step == (2 if evaluate == "ema" else 1) * STEPS_PER_EPOCH
    last_raw = recorder.states[-1]
    expected_ema = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(0.9))
    assert_close_to_reference(model.seen_in["validate"][1], expected_ema)
    assert_differs(model.seen_in["validate"][1], last_raw)

    checkpoint = load(tmp_path / "on_exception.ckpt")
    assert checkpoint["global_step"] == step
    assert_equal_states(checkpoint["state_dict"], last_raw)
    assert_close_to_reference(checkpoint["callbacks"][callback.state_key]["emas"][0], expected_ema)
    # the model itself holds its raw weights again
    assert_equal_states(snapshot(model), last_raw)


# ---------------------------------------------------------------------------------------------- 4. plain checkpoint
def test_plain_checkpoint_starts_ema_from_loaded_weights_with_one_warning(tmp_path: Path) -> None:
    run_fit(TinyClassifier(), [ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=2)
    path = tmp_path / "last.ckpt"
    plain = load(path)
    assert not ema_entries(plain)
    start = plain["global_step"]
    assert start == 2 * STEPS_PER_EPOCH

    recorder, callback, model = WeightRecorder(), EMACallback(decay=0.9), TinyClassifier()
    with pytest.warns(UserWarning) as record:
        run_fit(model, [recorder, callback], max_epochs=3, ckpt_path=path, num_sanity_val_steps=1)
    about_ema = [str(w.message) for w in record if "EMA" in str(w.message)]
    assert len(about_ema) == 1, about_ema
    assert "loaded weights" in about_ema[0]

    # right after resuming, the EMA is the loaded raw weights: the sanity check saw exactly them
    assert_equal_states(model.seen_in["validate"][0], plain["state_dict"])
    assert_equal_states(recorder.initial, plain["state_dict"])
    # ...and it continued from there: one update per optimizer step of epoch 2
    assert callback.num_updates == STEPS_PER_EPOCH
    expected = reference_ema(
        plain["state_dict"], recorder.steps, recorder.states, constant_decay(0.9), initial_step=start
    )
    assert_close_to_reference(callback.ema_state_dict(), expected)
    assert_differs(callback.ema_state_dict(), snapshot(model))


# ---------------------------------------------------------------------------------------------- 5. mismatch
@pytest.fixture(scope="module")
def trained_with_ema(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("mismatch")
    callback, model = EMACallback(decay=0.9), TinyClassifier()
    run_fit(model, [callback, ModelCheckpoint(dirpath=directory, save_last=True)], max_epochs=2)
    return directory / "last.ckpt", callback, model


MISMATCHES = {
    "missing": (lambda ema: ema.pop("net.0.bias"), ["net.0.bias"]),
    "unexpected": (lambda ema: ema.__setitem__("net.9.weight", torch.zeros(3)), ["net.9.weight"]),
    "shape": (lambda ema: ema.__setitem__("net.3.weight", torch.zeros(3, 8)), ["net.3.weight"]),
    "all-three": (
        lambda ema: (
            ema.pop("net.0.bias"),
            ema.__setitem__("net.9.weight", torch.zeros(3)),
            ema.__setitem__("net.3.weight", torch.zeros(3, 8)),
        ),
        ["net.0.bias", "net.9.weight", "net.3.weight"],
    ),
}


def write_mismatched(source: Path, target: Path, edit) -> dict:
    checkpoint = load(source)
    (state,) = ema_entries(checkpoint).values()
    edit(state["emas"][0])
    torch.save(checkpoint, target)
    return checkpoint


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_ema_raises_listing_names_and_loads_nothing(tmp_path: Path, trained_with_ema, kind: str) -> None:
    source, _, _ = trained_with_ema
    edit, names = MISMATCHES[kind]
    bad = tmp_path / "bad.ckpt"
    checkpoint = write_mismatched(source, bad, edit)

    callback, model = EMACallback(decay=0.9), TinyClassifier()
    with pytest.raises(EMAStateError) as error:
        run_fit(model, [callback], max_epochs=3, ckpt_path=bad)
    assert isinstance(error.value, ValueError)
    assert lightning_ema.EMAStateError is EMAStateError
    for name in names:
        assert name in str(error.value)
    # the model holds the checkpoint's raw weights; no EMA was (half-)loaded and no step was taken
    assert_equal_states(snapshot(model), checkpoint["state_dict"])
    assert callback.num_updates == 0
    with pytest.raises(RuntimeError):
        callback.ema_state_dict()


def test_mismatched_ema_into_bound_callback_keeps_previous_ema(tmp_path: Path, trained_with_ema) -> None:
    source, callback, model = trained_with_ema
    bad = tmp_path / "bad.ckpt"
    write_mismatched(source, bad, MISMATCHES["all-three"][0])
    before_ema = clone(callback.ema_state_dict())
    before_updates = callback.num_updates

    with pytest.raises(EMAStateError, match=r"net\.0\.bias"):
        run_fit(model, [callback], max_epochs=3, ckpt_path=bad)
    assert callback.num_updates == before_updates
    assert_equal_states(callback.ema_state_dict(), before_ema)
    assert set(callback.ema_state_dict()) == set(before_ema)


# ---------------------------------------------------------------------------------------------- 6. several EMAs
def several_callbacks(swapping: int) -> list[EMACallback]:
    """Decays 0.9 and 0.99; only callback ``swapping`` evaluates with its EMA, the other one with raw weights."""
    return [EMACallback(decay=d, evaluate="ema" if i == swapping else "raw") for i, d in enumerate((0.9, 0.99))]


@pytest.mark.parametrize("swapping", [0, 1], ids=["first-evaluates-ema", "second-evaluates-ema"])
def test_several_callbacks_save_and_resume_their_own_ema(tmp_path: Path, swapping: int) -> None:
    decays = (0.9, 0.99)

    recorder, model_a = WeightRecorder(), TinyClassifier()
    callbacks_a = several_callbacks(swapping)
    run_fit(model_a, [recorder, *callbacks_a], max_epochs=4)
    keys = [c.state_key for c in callbacks_a]
    assert len(set(keys)) == 2
    for callback, decay in zip(callbacks_a, decays, strict=True):
        expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(decay))
        assert_close_to_reference(callback.ema_state_dict(), expected)
    assert_differs(callbacks_a[0].ema_state_dict(), callbacks_a[1].ema_state_dict())
    # validation used the EMA of the callback that evaluates with it, and the raw weights came back
    assert_equal_states(model_a.seen_in["validate"][-1], callbacks_a[swapping].ema_state_dict())
    assert_equal_states(snapshot(model_a), recorder.states[-1])

    recorder_b = WeightRecorder()
    last = crash_after_two_epochs(tmp_path, [recorder_b, *several_callbacks(swapping)])
    saved = load(last)
    assert set(ema_entries(saved)) == set(keys)
    for key, decay in zip(keys, decays, strict=True):
        expected = reference_at(recorder_b, saved["global_step"], constant_decay(decay))
        assert_close_to_reference(saved["callbacks"][key]["emas"][0], expected)
    assert_equal_states(saved["state_dict"], raw_at(recorder_b, saved["global_step"]))

    # resume with fresh callbacks listed in the other order: each finds its own state by its key
    callbacks_c = several_callbacks(swapping)[::-1]
    model_c = TinyClassifier()
    run_fit(model_c, callbacks_c, max_epochs=4, ckpt_path=last)
    by_key = {c.state_key: c for c in callbacks_c}
    for callback_a in callbacks_a:
        resumed = by_key[callback_a.state_key]
        assert resumed.num_updates == callback_a.num_updates
        assert_equal_states(resumed.ema_state_dict(), callback_a.ema_state_dict())
    assert_equal_states(snapshot(model_c), snapshot(model_a))


@pytest.mark.parametrize("stage", ["fit", "validate"])
def test_several_callbacks_evaluating_ema_are_refused_before_touching_the_model(stage: str) -> None:
    # Two swaps of the same weights cannot nest through Lightning's hooks (both callbacks swap out in the
    # same order they swapped in); the package refuses the combination up front.
    model = TinyClassifier()
    initial = snapshot(model)
    recorder, callbacks = WeightRecorder(), [EMACallback(decay=0.9), EMACallback(decay=0.99)]
    trainer = L.Trainer(callbacks=[recorder, *callbacks], max_epochs=1, **trainer_kwargs())
    with pytest.raises(ValueError, match="evaluate") as error:
        getattr(trainer, stage)(model, make_loader() if stage == "fit" else make_loader(n=16))
    assert "raw" in str(error.value)
    assert recorder.steps == []
    assert model.seen_in["validate"] == []
    assert_equal_states(snapshot(model), initial)


# ---------------------------------------------------------------------------------------------- 7. test/validate
def test_test_with_ckpt_path_uses_that_checkpoints_ema(tmp_path: Path) -> None:
    callback, model = EMACallback(decay=0.9), TinyClassifier()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = run_fit(model, [callback, saver], max_epochs=3)
    end_of_fit_ema = clone(callback.ema_state_dict())

    path = tmp_path / "epoch=1.ckpt"
    checkpoint = load(path)
    saved_ema = checkpoint["callbacks"][callback.state_key]["emas"][0]
    assert_differs(saved_ema, end_of_fit_ema)

    trainer.test(model, make_loader(n=16), ckpt_path=path)
    seen = model.seen_in["test"][0]
    assert_equal_states(seen, saved_ema)
    assert_differs(seen, checkpoint["state_dict"])
    # after testing, the model holds the checkpoint's raw weights
    assert_equal_states(snapshot(model), checkpoint["state_dict"])


def test_validate_in_fresh_trainer_uses_checkpoint_ema_without_warning(tmp_path: Path, recwarn) -> None:
    callback = EMACallback(decay=0.9)
    run_fit(TinyClassifier(), [callback, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=2)
    checkpoint = load(tmp_path / "last.ckpt")

    recwarn.clear()
    fresh_callback, fresh_model = EMACallback(decay=0.9), TinyClassifier()
    trainer = L.Trainer(callbacks=[fresh_callback], **trainer_kwargs())
    trainer.validate(fresh_model, make_loader(n=16), ckpt_path=tmp_path / "last.ckpt")
    assert not [str(w.message) for w in recwarn if "EMA" in str(w.message)]
    assert_equal_states(fresh_model.seen_in["validate"][0], checkpoint["callbacks"][callback.state_key]["emas"][0])
    assert_equal_states(snapshot(fresh_model), checkpoint["state_dict"])


# ---------------------------------------------------------------------------------------------- 8. changed config
@pytest.mark.parametrize(
    ("new_callback", "decay", "every_n_steps", "changed"),
    [
        (lambda: EMACallback(decay=0.9, every_n_steps=2), 0.9, 2, "every_n_steps"),
        (lambda: EMACallback(decay=0.95), 0.95, 1, "decay"),
    ],
    ids=["every_n_steps", "decay"],
)
def test_resume_with_changed_config_warns_and_continues(
    tmp_path: Path, new_callback, decay: float, every_n_steps: int, changed: str
) -> None:
    old = EMACallback(decay=0.9)
    run_fit(TinyClassifier(), [old, ModelCheckpoint(dirpath=tmp_path, save_last=True)], max_epochs=2)
    path = tmp_path / "last.ckpt"
    checkpoint = load(path)
    saved = checkpoint["callbacks"][old.state_key]
    start = checkpoint["global_step"]

    recorder, callback = WeightRecorder(), new_callback()
    with pytest.warns(UserWarning, match="configuration") as record:
        trainer = run_fit(TinyClassifier(), [recorder, callback], max_epochs=3, ckpt_path=path)
    config_warnings = [str(w.message) for w in record if "configuration" in str(w.message)]
    assert len(config_warnings) == 1
    assert changed in config_warnings[0]

    assert trainer.global_step == 3 * STEPS_PER_EPOCH
    assert callback.num_updates == saved["num_updates"] + STEPS_PER_EPOCH // every_n_steps
    expected = reference_ema(
        saved["emas"][0],
        recorder.steps,
        recorder.states,
        constant_decay(decay),
        every_n_steps=every_n_steps,
        initial_step=start,
    )
    assert_close_to_reference(callback.ema_state_dict(), expected)
