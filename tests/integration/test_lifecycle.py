"""Which EMA each Trainer entry point uses (README: "What the EMA does when..."), case by case.

Each test runs a real Trainer and compares what the module held against recorded raw weights, a plain-loop
reference EMA, or the callback's own EMA bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
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
from torch import Tensor, nn

from lightning_ema import EMACallback, EMAStateError
from lightning_ema import functional as F

DECAY = 0.8


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def fit(callbacks: list[L.Callback], model: L.LightningModule | None = None, **kwargs: object) -> L.Trainer:
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(**{"max_epochs": 1, **kwargs}))
    trainer.fit(model or TinyClassifier(), make_loader())
    return trainer


# 1. testing a loaded checkpoint after fit
def test_testing_another_module_after_fit_uses_its_own_weights_with_a_warning(tmp_path: Path) -> None:
    ema = EMACallback(DECAY)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fit([ema, checkpoint], max_epochs=2, enable_checkpointing=True)
    best = TinyClassifier.load_from_checkpoint(checkpoint.last_model_path)
    raw = snapshot(best)
    with pytest.warns(UserWarning, match=r"evaluates the module's own \(raw\) weights.*another module.*ckpt_path"):
        trainer.test(best, make_loader())
    assert_same(best.seen_in["test"][0], raw)
    # ... and with ckpt_path the checkpoint's EMA is tested
    other = TinyClassifier()
    trainer.test(other, make_loader(), ckpt_path=checkpoint.last_model_path)
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    (state,) = (s for k, s in saved["callbacks"].items() if k.startswith("EMACallback"))
    assert_same(other.seen_in["test"][0], state["emas"][0])


# 2. a callback reused by a new Trainer
def test_a_callback_reused_by_a_new_trainer_starts_a_new_ema_for_the_new_model() -> None:
    ema = EMACallback(DECAY)
    fit([ema])
    first_updates = ema.num_updates
    recorder = WeightRecorder()
    model = TinyClassifier()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # another model: its EMA must not start from the first one's
    fit([recorder, ema], model)
    assert first_updates == ema.num_updates == 8
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(DECAY))
    assert_close_to_reference(ema.ema_state_dict(), expected)
    # validation of the new model uses the new EMA
    trainer = L.Trainer(callbacks=[ema], **trainer_kwargs())
    trainer.validate(model, make_loader())
    assert_same(model.seen_in["validate"][-1], ema.ema_state_dict())


# 4. an EMA first created under inference mode
def test_validate_before_fit_then_fit_and_backward_through_a_swapped_ema(tmp_path: Path) -> None:
    ema = EMACallback(DECAY)
    model = TinyClassifier()
    trainer = L.Trainer(callbacks=[ema], **trainer_kwargs(max_epochs=1, enable_checkpointing=True))
    with pytest.warns(UserWarning, match="no `fit` ran with it"):
        trainer.validate(model, make_loader())
    assert_same(model.seen_in["validate"][0], snapshot(TinyClassifier()))  # the raw weights
    trainer.fit(model, make_loader())
    assert ema.num_updates == 8
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    tested = TinyClassifier()
    L.Trainer(callbacks=[ema], **trainer_kwargs()).test(tested, make_loader(), ckpt_path=str(path))
    assert not any(t.is_inference() for t in ema.ema_state_dict().values())
    with ema.swapped(tested):
        loss = tested(torch.randn(4, 4)).sum()
        loss.backward()  # "Inference tensors cannot be saved for backward" before
    assert tested.net[0].weight.grad is not None


# 5. tensors replaced behind the EMA's back
class ReassignsBuffer(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.mean = 0.9 * self.mean + 0.1 * batch[0].mean(0)  # out of place: a new tensor object each step
        return super().training_step(batch, batch_idx)


def test_a_buffer_reassigned_out_of_place_is_followed_by_name() -> None:
    ema = EMACallback(DECAY)
    recorder = WeightRecorder()
    model = ReassignsBuffer()
    fit([recorder, ema], model, max_epochs=3)
    # re-paired at each epoch start: the EMA of `mean` follows from epoch 1 on, instead of staying at zero
    assert ema.ema_state_dict()["mean"].abs().sum() > 0
    trainer = L.Trainer(callbacks=[ema], **trainer_kwargs())
    trainer.validate(model, make_loader())
    assert torch.equal(model.seen_in["validate"][-1]["mean"], ema.ema_state_dict()["mean"])


def test_swa_replacing_batchnorm_statistics_is_followed() -> None:
    ema = EMACallback(DECAY)
    model = TinyClassifier()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    trainer = fit([swa, ema], model, max_epochs=3)
    assert ema.num_updates == trainer.global_step
    # SWA resets and recomputes BatchNorm statistics into new tensors: the EMA is paired with the live ones
    trainer = L.Trainer(callbacks=[ema], **trainer_kwargs())
    trainer.validate(model, make_loader())
    for name in ("net.1.running_mean", "net.1.running_var"):
        assert torch.equal(model.seen_in["validate"][-1][name], ema.ema_state_dict()[name]), name


def test_dtype_conversion_after_fit_keeps_the_new_dtype_through_a_swap() -> None:
    ema = EMACallback(DECAY)
    model = TinyClassifier()
    fit([ema], model)
    averages = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    model.to(torch.bfloat16)
    raw = snapshot(model)
    with ema.swapped(model):
        assert model.net[0].weight.dtype == torch.bfloat16
        assert torch.equal(model.net[0].weight, averages["net.0.weight"].to(torch.bfloat16))
    assert model.net[0].weight.dtype == torch.bfloat16
    assert_same(snapshot(model), raw)


def test_a_parameter_that_changed_shape_is_named() -> None:
    ema = EMACallback(DECAY)
    model = TinyClassifier()
    fit([ema], model)
    model.net[3] = nn.Linear(16, 5)
    with pytest.raises(EMAStateError, match=r"net\.3\.weight"), ema.swapped(model):
        pass


# 6. lazy modules
class LazyClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))


def test_a_lazy_module_gets_its_ema_once_materialised_before_the_first_step() -> None:
    class RecordMaterialised(WeightRecorder):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            pass  # nothing to record yet: the weights are uninitialized

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
            if trainer.global_step == 0:
                self.initial = snapshot(pl_module)  # the first forward has materialised the weights

    ema = EMACallback(DECAY)
    recorder = RecordMaterialised()
    fit([recorder, ema], LazyClassifier(), max_epochs=2)
    assert ema.num_updates == 16
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(DECAY))
    assert_close_to_reference(ema.ema_state_dict(), expected)


# 7. a saved step counter ahead of the Trainer
def test_a_saved_step_count_ahead_of_the_run_warns_and_keeps_updating(tmp_path: Path) -> None:
    ema = EMACallback(DECAY)
    trainer = fit([ema], enable_checkpointing=True)
    path = tmp_path / "edited.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    (key,) = (k for k in checkpoint["callbacks"] if k.startswith("EMACallback"))
    checkpoint["callbacks"][key]["last_update_step"] = 10_000
    checkpoint["callbacks"][key]["step"] = 10_000
    torch.save(checkpoint, path)
    resumed = EMACallback(DECAY)
    trainer = L.Trainer(callbacks=[resumed], **trainer_kwargs(max_epochs=2))
    with pytest.warns(UserWarning, match="ahead of this run's step 8"):
        trainer.fit(TinyClassifier(), make_loader(), ckpt_path=str(path))
    assert resumed.num_updates == 8 + 8


# 11. silent misconfiguration
def test_patterns_that_match_nothing_are_named() -> None:
    with pytest.warns(UserWarning, match=r"`include` pattern.*'nett\.\*'"):
        fit([EMACallback(DECAY, include=["net.0.*", "nett.*"])])


def test_weights_only_checkpoints_warn_that_they_hold_no_ema(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"save_weights_only=True.*no EMA"):
        fit(
            [EMACallback(DECAY), ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)],
            enable_checkpointing=True,
        )


def test_a_decay_too_slow_for_the_run_warns_with_the_share_of_initial_weights() -> None:
    with pytest.warns(UserWarning, match=r"still 100% the initial weights"):
        fit([EMACallback(0.9999)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*initial weights.*")
        fit([EMACallback(0.5)])


# 12. messages
def test_messages_name_the_entry_point_not_an_enum(tmp_path: Path) -> None:
    with pytest.warns(UserWarning) as record:
        L.Trainer(callbacks=[EMACallback(DECAY)], **trainer_kwargs()).validate(TinyClassifier(), make_loader())
    text = " ".join(str(w.message) for w in record)
    assert "this validate run" in text and "TrainerFn" not in text


def test_loading_with_changed_settings_in_test_says_loading_not_resuming(tmp_path: Path) -> None:
    trainer = fit([EMACallback(DECAY, every_n_steps=1)], enable_checkpointing=True)
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    with pytest.warns(UserWarning, match=r"^Loading an EMA saved with a different configuration"):
        L.Trainer(callbacks=[EMACallback(DECAY, every_n_steps=2)], **trainer_kwargs()).test(
            TinyClassifier(), make_loader(), ckpt_path=str(path)
        )


# 10. export of a compiled submodule
class CompiledSubmodule(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net, backend="eager")


class QuietClassifier(TinyClassifier):
    """``self.log`` inside a compiled ``training_step`` breaks Dynamo in this Lightning/torch pair (without any EMA)."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_a_whole_compiled_module_gets_the_reference_ema_and_evaluates_with_it() -> None:
    recorder, ema = WeightRecorder(), EMACallback(DECAY)
    model = QuietClassifier()
    trainer = L.Trainer(callbacks=[recorder, ema], **trainer_kwargs(max_epochs=2))
    trainer.fit(torch.compile(model, backend="eager"), make_loader())
    assert recorder.initial is not None
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, constant_decay(DECAY))
    averaged = {F.canonical_name(name): tensor for name, tensor in ema.ema_state_dict().items()}
    assert_close_to_reference({name: averaged[name] for name in expected}, expected)
    raw = snapshot(model)
    trainer.validate(model, make_loader())
    seen = model.seen_in["validate"][-1]
    assert_close_to_reference({name: seen[name] for name in expected}, expected)
    assert all(torch.equal(tensor, raw[name]) for name, tensor in model.state_dict().items())


def test_export_of_a_compiled_submodule_has_the_uncompiled_names(tmp_path: Path) -> None:
    from lightning_ema import load_ema_state_dict

    ema = EMACallback(DECAY)
    model = CompiledSubmodule()
    trainer = fit([ema], model, enable_checkpointing=True)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    weights = load_ema_state_dict(path, prefix="net.")
    plain = TinyClassifier().net
    plain.load_state_dict(weights)  # strict: every name matches the uncompiled module
    for name, tensor in ema.ema_state_dict().items():
        plain_name = name.replace("_orig_mod.", "").removeprefix("net.")
        assert torch.equal(plain.state_dict()[plain_name], tensor), name
