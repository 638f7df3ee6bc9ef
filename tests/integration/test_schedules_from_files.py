"""Schedules in real runs and real files: reaching 1, one identity per configuration, validation on every path.

Issue 9 items 8 (a schedule may reach decay 1; a constant 1 stays refused) and 9 (equal configurations have one
``state_key``; checkpoints written under the older, un-normalised key are still found), and issue 13 case 6
(a schedule delivered by a checkpoint's hyper-parameters or by YAML is validated like one built in code).
Expected EMAs come from the plain-loop ``reference_ema`` over weights recorded after every step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from support import (
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    load,
    make_loader,
    reference_ema,
    trainer_kwargs,
)
from torch import Tensor

from lightning_ema import EMA, EMACallback, MeanTeacherModule, load_ema_state_dict
from lightning_ema.schedules import ConstantDecay, CosineDecay, WarmupDecay


class EMARecorder(L.Callback):
    """After the EMACallback (put it later in the list): a copy of the EMA after each optimizer step."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.by_step: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.by_step[trainer.global_step] = {n: t.clone() for n, t in self.ema.ema_state_dict().items()}


def cosine(start: float, end: float, total: int):  # type: ignore[no-untyped-def]
    return lambda t: end - (end - start) * (math.cos(math.pi * min(t, total) / total) + 1.0) / 2.0


# ---------------------------------------------------------------------------------------------- issue 9, item 8
@pytest.mark.parametrize("every_n_steps", [1, 3])
def test_a_cosine_schedule_ending_at_one_averages_then_freezes_the_ema(every_n_steps: int) -> None:
    total = 6
    ema = EMACallback(decay=CosineDecay(0.5, 1.0, total_steps=total), every_n_steps=every_n_steps)
    recorder, ema_recorder = WeightRecorder(), EMARecorder(ema)
    trainer = L.Trainer(callbacks=[recorder, ema, ema_recorder], max_epochs=2, **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader())  # 16 optimizer steps
    names = list(ema.ema_state_dict())
    floating = [n for n in names if ema.ema_state_dict()[n].is_floating_point()]
    assert recorder.initial is not None
    expected = reference_ema(
        recorder.initial,
        recorder.steps,
        recorder.states,
        cosine(0.5, 1.0, total),
        every_n_steps=every_n_steps,
        names=floating,
    )
    assert_close_to_reference(ema.ema_state_dict(), expected)
    # from the first update at or after total_steps on, updates have weight 0: the EMA does not move by one bit
    frozen_from = math.ceil(total / every_n_steps) * every_n_steps
    for step in range(frozen_from, 17):
        for name in floating:
            assert torch.equal(ema_recorder.by_step[step][name], ema_recorder.by_step[frozen_from][name]), (step, name)
    # ...while the raw weights kept training
    assert not torch.equal(recorder.states[-1]["net.0.weight"], recorder.states[frozen_from - 1]["net.0.weight"])


def test_bf16_weights_and_several_decays_handle_a_decay_of_one() -> None:
    module = torch.nn.Linear(4, 3).to(torch.bfloat16)
    averager = EMA(module, [CosineDecay(0.5, 1.0, total_steps=2), 0.9])
    averager.update(2)  # steps 1..2: decays 0.75 and 1.0
    before = [{n: t.clone() for n, t in averager.ema_state_dict(k).items()} for k in (0, 1)]
    with torch.no_grad():
        module.weight.add_(1.0)
    averager.update(3)  # decay 1 for the first EMA, 0.9 for the second
    for name, tensor in averager.ema_state_dict(0).items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, before[0][name]), name
    assert not torch.equal(averager.ema_state_dict(1)["weight"], before[1]["weight"])


@pytest.mark.parametrize(
    "make",
    [lambda: EMACallback(decay=1.0), lambda: EMACallback(decay=[0.9, 1]), lambda: Teacher(teacher_decay=1.0)],
    ids=["float", "in a list", "mean teacher"],
)
def test_a_constant_decay_of_one_stays_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="freeze"):
        make()


# ---------------------------------------------------------------------------------------------- issue 9, item 9
def test_equal_configurations_have_one_state_key() -> None:
    assert EMACallback(WarmupDecay(0.995, 10)).state_key == EMACallback(WarmupDecay(0.995, 10.0)).state_key
    assert (
        EMACallback([0.9, WarmupDecay(0.99, 100)]).state_key == EMACallback([0.9, WarmupDecay(0.99, 100.0)]).state_key
    )


# The key and the config an older version wrote for EMACallback(WarmupDecay(0.995, 10)), written out by hand.
OLD_KEY = "EMACallback{'decay': 'WarmupDecay(decay=0.995, warmup=10)', 'include': None, 'exclude': None}"
OLD_REPR = "WarmupDecay(decay=0.995, warmup=10)"


@pytest.fixture(scope="module")
def old_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A checkpoint of two EMACallbacks whose warm-up one is stored under the older, un-normalised key."""
    directory = tmp_path_factory.mktemp("old")
    callbacks = [EMACallback(WarmupDecay(0.995, 10)), EMACallback(0.9, evaluate="raw")]
    trainer = L.Trainer(callbacks=callbacks, max_epochs=1, **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader())
    trainer.save_checkpoint(directory / "new.ckpt")
    checkpoint = load(directory / "new.ckpt")
    state = checkpoint["callbacks"].pop(callbacks[0].state_key)
    assert callbacks[0].state_key != OLD_KEY  # the key format did change
    state["config"]["decays"] = [OLD_REPR]
    checkpoint["callbacks"][OLD_KEY] = state
    torch.save(checkpoint, directory / "old.ckpt")
    return directory / "old.ckpt", state


def test_a_checkpoint_under_the_old_key_resumes_without_warnings(old_format: tuple[Path, dict[str, Any]]) -> None:
    path, saved = old_format
    warmup, constant = EMACallback(WarmupDecay(0.995, 10.0)), EMACallback(0.9, evaluate="raw")  # as YAML builds it
    trainer = L.Trainer(callbacks=[warmup, constant], max_epochs=1, **trainer_kwargs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(), make_loader(), ckpt_path=path)  # max_epochs reached: restores, takes no step
    # Lightning itself still names the old key as a callback "to add" (it compares keys as strings, before any
    # callback runs); lightning-ema says nothing: neither "has no EMA for" nor "different configuration".
    ours = [str(w.message) for w in caught if "EMA" in str(w.message) and "Be aware" not in str(w.message)]
    assert not ours, ours
    loaded = warmup.state_dict()  # the loaded EMA, waiting for the first training step to bind it
    assert loaded["num_updates"] == saved["num_updates"]
    for name, tensor in saved["emas"][0].items():
        assert torch.equal(loaded["emas"][0][name], tensor), name
    assert not torch.equal(loaded["emas"][0]["net.0.weight"], constant.state_dict()["emas"][0]["net.0.weight"])


def test_load_ema_state_dict_finds_the_old_key_by_the_new_one(old_format: tuple[Path, dict[str, Any]]) -> None:
    path, saved = old_format
    weights = load_ema_state_dict(path, state_key=EMACallback(WarmupDecay(0.995, 10.0)).state_key)
    for name, tensor in saved["emas"][0].items():
        assert torch.equal(weights[name], tensor), name
    assert set(weights) == set(load(path)["state_dict"])


# ---------------------------------------------------------------------------------------------- issue 13, case 6
class Teacher(MeanTeacherModule):
    def __init__(self, teacher_decay: Any = 0.9, lr: float = 0.1) -> None:
        super().__init__(teacher_decay)
        self.save_hyperparameters()
        self.student = torch.nn.Linear(4, 3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.student(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint whose hyper-parameters hold ConstantDecay(decay=1.5), built without its constructor."""
    directory = tmp_path_factory.mktemp("tampered")
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs())
    trainer.fit(Teacher(teacher_decay=ConstantDecay(0.9)), make_loader())
    trainer.save_checkpoint(directory / "good.ckpt")
    checkpoint = load(directory / "good.ckpt")  # the built-in schedules load with weights_only=True
    assert checkpoint["hyper_parameters"]["teacher_decay"] == ConstantDecay(0.9)
    bad = object.__new__(ConstantDecay)
    bad.__dict__["decay"] = 1.5
    checkpoint["hyper_parameters"]["teacher_decay"] = bad
    torch.save(checkpoint, directory / "bad.ckpt")
    return directory / "bad.ckpt"


def test_load_from_checkpoint_refuses_an_invalid_schedule(tampered: Path) -> None:
    with pytest.raises(
        ValueError, match=r"A saved ConstantDecay is invalid: `decay` must be a float in \[0, 1\), got 1.5"
    ):
        Teacher.load_from_checkpoint(tampered)


def test_resuming_from_it_refuses_the_schedule_too(tampered: Path) -> None:
    trainer = L.Trainer(max_epochs=2, **trainer_kwargs())
    with pytest.raises(ValueError, match=r"got 1\.5"):
        trainer.fit(Teacher(), make_loader(), ckpt_path=tampered)


def test_a_schedule_edited_after_construction_is_refused_by_the_callback() -> None:
    schedule = WarmupDecay(0.99)
    schedule.decay = 1.5
    with pytest.raises(ValueError, match=r"^`decay` must be a valid schedule, got a WarmupDecay with `decay` must be"):
        EMACallback(decay=schedule)
    with pytest.raises(ValueError, match=r"^`teacher_decay` must be a valid schedule"):
        Teacher(teacher_decay=schedule)


def write_config(path: Path, decay: str) -> Path:
    path.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_ema.EMACallback\n"
        "      init_args:\n"
        f"        decay: {decay}\n"
    )
    return path


def test_yaml_schedules_are_validated_and_share_the_scripts_state_key(tmp_path: Path) -> None:
    good = write_config(
        tmp_path / "good.yaml",
        "{class_path: lightning_ema.schedules.WarmupDecay, init_args: {decay: 0.995, warmup: 10}}",
    )
    cli = LightningCLI(TinyClassifier, args=["--config", str(good)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EMACallback)]
    assert callback.state_key == EMACallback(WarmupDecay(0.995, 10)).state_key

    reaching_one = write_config(
        tmp_path / "one.yaml",
        "{class_path: lightning_ema.schedules.CosineDecay, init_args: {start: 0.996, end: 1.0, total_steps: 100}}",
    )
    cli = LightningCLI(TinyClassifier, args=["--config", str(reaching_one)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EMACallback)]
    assert callback.schedule == CosineDecay(0.996, 1.0, 100)

    bad = write_config(
        tmp_path / "bad.yaml", "{class_path: lightning_ema.schedules.ConstantDecay, init_args: {decay: 1.5}}"
    )
    with pytest.raises(ValueError) as info:  # jsonargparse's error, which quotes the schedule's own message
        LightningCLI(TinyClassifier, args=["--config", str(bad)], run=False)
    assert "`decay` must be a float in [0, 1), got 1.5." in str(info.value)
