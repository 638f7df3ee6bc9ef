"""lightning_ema.compat reproduces the hooks it replaces, update for update, in a real Trainer (issue 11).

For every system and several settings, the raw weights after each of 24 optimizer steps are recorded from a real
Trainer, the original's update rule (re-implemented in ``tests/references.py`` without lightning_ema) is replayed
over them, and the EMA the compat class holds after each step must match: max |difference| < 1e-6 (float32) over
the whole trajectory, integer buffers exactly.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import references as R
import torch
from support import make_loader, snapshot, trainer_kwargs
from torch import Tensor, nn

from lightning_ema import EMACallback, MeanTeacherModule
from lightning_ema.compat import (
    MMagicEMAHook,
    MMCVEMAHook,
    MMYOLOExpMomentumEMA,
    TimmModelEma,
    mean_teacher_hook_args,
)
from lightning_ema.schedules import PowerDecay, WarmupDecay

STEPS = 24
TOLERANCE = 1e-6


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class Net(L.LightningModule):
    """A generator-like ``net`` (what is averaged) and a ``head`` that mmagic's hook leaves out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = make_net()
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.net(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class Recorder(L.Callback):
    """After the EMA callback: the raw weights and the callback's EMA after each optimizer step."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.initial: dict[str, Tensor] = {}
        self.raw: list[dict[str, Tensor]] = []
        self.emas: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = snapshot(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.raw.append(snapshot(pl_module))
        self.emas.append({name: t.detach().clone() for name, t in self.ema.ema_state_dict().items()})


def fit(callback: EMACallback, module: L.LightningModule | None = None) -> Recorder:
    module = module if module is not None else Net()
    recorder = Recorder(callback)
    trainer = L.Trainer(max_steps=STEPS, callbacks=[callback, recorder], **trainer_kwargs())
    trainer.fit(module, make_loader(n=8 * STEPS))
    assert trainer.global_step == STEPS and len(recorder.raw) == STEPS
    return recorder


def assert_trajectories_match(ours: list[dict[str, Tensor]], expected: list[dict[str, Tensor]]) -> None:
    assert len(ours) == len(expected)
    worst = 0.0
    for step, (mine, theirs) in enumerate(zip(ours, expected, strict=True), start=1):
        assert sorted(mine) == sorted(theirs), f"step {step}: names differ"
        for name, tensor in theirs.items():
            if tensor.is_floating_point():
                worst = max(worst, float((mine[name].double() - tensor.double()).abs().max()))
            else:
                assert torch.equal(mine[name], tensor), f"step {step}, {name}: {mine[name]} vs {tensor}"
    assert worst < TOLERANCE, f"max |difference| over the trajectory: {worst:.3g}"


def effective(recorder: Recorder) -> list[dict[str, Tensor]]:
    """The EMA model as evaluation sees it: the raw tensors the EMA does not track, the EMA elsewhere."""
    return [{**raw, **ema} for raw, ema in zip(recorder.raw, recorder.emas, strict=True)]


def parameters_of(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


# ----------------------------------------------------------------------------------------------------- mmcv
@pytest.mark.parametrize(
    "arguments",
    [{}, {"interval": 3}, {"momentum": 0.3, "warm_up": 10}, {"momentum": 0.6, "interval": 2, "warm_up": 10}],
    ids=["defaults", "interval3", "warm_up_binds", "warm_up_and_interval"],
)
def test_mmcv_ema_hook(arguments: dict[str, Any]) -> None:
    callback = MMCVEMAHook(**arguments)
    recorder = fit(callback)
    settings = {"momentum": 0.0002, "interval": 1, "warm_up": 100, **arguments}
    expected = R.mmcv_ema_hook(recorder.initial, recorder.raw, parameters_of(Net()), **settings)
    assert sorted(recorder.emas[0]) == sorted(parameters_of(Net()))  # buffers are not averaged
    assert_trajectories_match(effective(recorder), expected)


# ---------------------------------------------------------------------------------------------------- mmyolo
@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"gamma": 10},
        {"gamma": 10, "interval": 3},
        {"momentum": 0.1, "gamma": 10, "update_buffers": True},
        {"momentum": 0.1, "gamma": 10, "interval": 3, "update_buffers": True, "begin_iter": 4},
    ],
    ids=["defaults", "gamma10", "gamma10_interval3", "buffers", "buffers_interval3_begin4"],
)
def test_mmyolo_exp_momentum_ema(arguments: dict[str, Any]) -> None:
    callback = MMYOLOExpMomentumEMA(**arguments)
    recorder = fit(callback)
    settings = {"momentum": 0.0002, "gamma": 2000, "interval": 1, "update_buffers": False, **arguments}
    expected = R.mmyolo_exp_momentum_ema(recorder.initial, recorder.raw, parameters_of(Net()), **settings)
    assert_trajectories_match(effective(recorder), expected)
    if settings["update_buffers"]:
        # integer buffers keep the copy made at the EMA's start (mmengine never averages them)
        ema = recorder.emas[-1]["net.1.num_batches_tracked"]
        assert int(ema) == max(settings.get("begin_iter", 0), 1) < STEPS


# ------------------------------------------------------------------------------------------------------ timm
@pytest.mark.parametrize("decay", [0.9999, 0.9, 0.5])
def test_timm_model_ema(decay: float) -> None:
    callback = TimmModelEma(decay=decay)
    recorder = fit(callback)
    expected = R.timm_model_ema(recorder.initial, recorder.raw, decay)
    assert sorted(recorder.emas[0]) == sorted(recorder.initial)  # the whole state_dict, integers included
    assert_trajectories_match(recorder.emas, expected)
    if decay < 0.99:  # the truncated integer average moves, and lags the count
        counts = [int(ema["net.1.num_batches_tracked"]) for ema in recorder.emas]
        assert 0 < counts[-1] < STEPS


# ---------------------------------------------------------------------------------------------------- mmagic
@pytest.mark.parametrize(
    "arguments",
    [
        {"interval": 1},
        {"interval": 3, "interp_cfg": {"momentum": 0.1}},
        {"interval": 1, "interp_cfg": {"momentum": 0.1, "momentum_nontrainable": 0.5}},
        {"interval": 3, "start_iter": 4, "interp_cfg": {"momentum": 0.1, "momentum_nontrainable": 0.3}},
        {"start_iter": 4},
    ],
    ids=["interval1", "interval3", "nontrainable", "start4_interval3", "default_interval_never_averages"],
)
def test_mmagic_ema_hook(arguments: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = MMagicEMAHook("net_ema", **arguments)
    assert any("never averages" in str(w.message) for w in caught) == ("interval" not in arguments)
    recorder = fit(callback)
    cfg = {"momentum": 0.001, "momentum_nontrainable": 1.0, **arguments.get("interp_cfg", {})}
    initial = {k[len("net.") :]: v for k, v in recorder.initial.items() if k.startswith("net.")}
    raw = [{k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")} for state in recorder.raw]
    expected = R.mmagic_ema_hook(
        initial,
        raw,
        parameters_of(make_net()),
        cfg["momentum"],
        cfg["momentum_nontrainable"],
        arguments.get("interval", -1),
        arguments.get("start_iter", 0),
    )
    ours = [{k[len("net.") :]: v for k, v in ema.items()} for ema in recorder.emas]
    assert_trajectories_match(ours, expected)


# ----------------------------------------------------------------------------------------------------- mmdet
class Teacher(MeanTeacherModule):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        torch.manual_seed(0)
        self.student = make_net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with torch.no_grad():
            target = self.teacher(x).softmax(dim=1)
        logits = self.student(x)
        return nn.functional.cross_entropy(logits, y) + nn.functional.mse_loss(logits.softmax(dim=1), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class TeacherRecorder(L.Callback):
    """Student after each step (callbacks run before the module's update) and the teacher after each update."""

    def __init__(self) -> None:
        self.student_at_start: dict[str, Tensor] = {}
        self.teacher_at_start: dict[str, Tensor] = {}
        self.students: list[dict[str, Tensor]] = []
        self.teachers: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.student_at_start, self.teacher_at_start = snapshot(pl_module.student), snapshot(pl_module.teacher)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.students.append(snapshot(pl_module.student))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.students:
            self.teachers.append(snapshot(pl_module.teacher))

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.teachers.append(snapshot(pl_module.teacher))


@pytest.mark.parametrize(
    "arguments",
    [{}, {"momentum": 0.1, "interval": 3}, {"momentum": 0.1, "skip_buffers": False}],
    ids=["defaults", "interval3", "buffers"],
)
def test_mmdet_mean_teacher_hook(arguments: dict[str, Any]) -> None:
    module = Teacher(**mean_teacher_hook_args(**arguments))
    # The student changes after the teacher was made (a pretrained backbone loaded later): mmdet's copy at
    # iteration 0 must bring it to the teacher; integer buffers are left as the teacher has them.
    with torch.no_grad():
        for parameter in module.student.parameters():
            parameter.mul_(1.5).add_(0.1)
        module.student[1].running_mean.fill_(0.3)
        module.student[1].num_batches_tracked.fill_(7)
    recorder = TeacherRecorder()
    trainer = L.Trainer(max_steps=STEPS, callbacks=[recorder], **trainer_kwargs())
    trainer.fit(module, make_loader(n=8 * STEPS))
    settings = {"momentum": 0.001, "interval": 1, "skip_buffers": True, **arguments}
    expected = R.mmdet_mean_teacher_hook(
        recorder.student_at_start,
        recorder.teacher_at_start,
        recorder.students,
        parameters_of(make_net()),
        **settings,
    )
    assert_trajectories_match(recorder.teachers, expected)
    assert int(recorder.teachers[-1]["1.num_batches_tracked"]) == 0


# ------------------------------------------------------------------- the power and linear warm-ups of the others
@pytest.mark.parametrize(
    ("callback", "reference"),
    [
        (
            lambda: EMACallback(PowerDecay(0.999, 1.0, 2 / 3), start_step=1, count_from_start=True, buffers="ignore"),
            lambda: R.timm_v3_decay(0.999, 0.0, 0, 1.0, 2 / 3),
        ),
        (
            lambda: EMACallback(
                PowerDecay(0.99, 2.0, 0.75, 0.1), start_step=4, count_from_start=True, buffers="ignore"
            ),
            lambda: R.timm_v3_decay(0.99, 0.1, 3, 2.0, 0.75),
        ),
        (
            lambda: EMACallback(PowerDecay(0.999, 1.0, 2 / 3), start_step=3, count_from_start=True, buffers="ignore"),
            lambda: R.diffusers_decay(0.999, 2, True, 1.0, 2 / 3),
        ),
        (
            lambda: EMACallback(WarmupDecay(0.999, 10), start_step=1, count_from_start=True, buffers="ignore"),
            lambda: R.diffusers_decay(0.999, 0, False, 1.0, 2 / 3),
        ),
        (lambda: EMACallback(WarmupDecay(0.99, 10), buffers="ignore"), lambda: R.torch_ema_decay(0.99)),
        (
            lambda: EMACallback(PowerDecay(0.995, 1.0, 2 / 3), start_step=6, count_from_start=True, buffers="ignore"),
            lambda: R.ema_pytorch_decay(0.995, 5, 1.0, 2 / 3),
        ),
    ],
    ids=["timm_v3", "timm_v3_update_after_3", "diffusers_power", "diffusers_default", "torch_ema", "ema_pytorch"],
)
def test_warmups_of_other_libraries(callback: Any, reference: Any) -> None:
    ema = callback()
    recorder = fit(ema)
    expected = R.warmup_ema(recorder.initial, recorder.raw, parameters_of(Net()), reference())
    assert_trajectories_match(recorder.emas, expected)


# ------------------------------------------------------------------------------------------- configuration
def test_compat_classes_refuse_settings_they_derive_and_bad_originals() -> None:
    with pytest.raises(ValueError, match="`every_n_steps` is set by MMCVEMAHook"):
        MMCVEMAHook(every_n_steps=2)
    with pytest.raises(ValueError, match="`momentum` must be a float in \\(0, 1\\)"):
        MMYOLOExpMomentumEMA(momentum=0.0)
    with pytest.raises(ValueError, match="`module_keys` must name EMA modules ending in '_ema'"):
        MMagicEMAHook("generator")
    with pytest.raises(ValueError, match="`interp_cfg` must only set"):
        MMagicEMAHook("generator_ema", interval=1, interp_cfg={"beta": 0.5})
    with pytest.raises(ValueError, match="`interval` must be an integer >= 1"):
        mean_teacher_hook_args(interval=0)
    # everything else passes through to EMACallback
    assert TimmModelEma(decay=0.99, evaluate="raw").evaluate == "raw"


def test_compat_class_from_lightning_cli_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_ema.compat.MMCVEMAHook
      init_args: {{momentum: 0.3, interval: 2, warm_up: 10}}
"""
    )

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> Any:
            return make_loader()

    cli = LightningCLI(Net, Data, args=["fit", "--config", str(config)], run=True, save_config_callback=None)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, MMCVEMAHook))
    assert (callback.momentum, callback.interval, callback.warm_up) == (0.3, 2, 10)
    assert callback.num_updates == 3  # after steps 1, 3 and 5
