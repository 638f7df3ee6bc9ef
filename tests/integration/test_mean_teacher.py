"""MeanTeacherModule in a real Trainer on CPU: teacher values, freezing, checkpoints, resume, evaluation, CLI (§5).

Every expected value comes from outside the code under test: student weights recorded after each optimizer step
by ``StudentRecorder`` (a callback, so it runs before the module's own ``on_train_batch_end``), the plain float64
loop ``reference_ema``, a second uninterrupted run, or the files a Trainer wrote.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import (
    CrashAtEpochStart,
    assert_close_to_reference,
    constant_decay,
    load,
    make_loader,
    reference_ema,
    snapshot,
    trainer_kwargs,
    warmup_decay,
)
from torch import Tensor, nn

from lightning_ema import EMACallback, NonFiniteUpdateError
from lightning_ema.mean_teacher import MeanTeacherModule
from lightning_ema.schedules import DecaySchedule, WarmupDecay

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS_PER_EPOCH = 8  # make_loader(): 64 samples in batches of 8


# ---------------------------------------------------------------------------------------------- test material
def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class TinyMeanTeacher(MeanTeacherModule):
    """A student trained on labels plus a consistency term towards the teacher; records what evaluation sees."""

    def __init__(
        self,
        teacher_decay: float | DecaySchedule = 0.9,
        lr: float = 0.1,
        use_all_parameters: bool = True,
        fail_in_validation_at: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(teacher_decay, **options)
        self.save_hyperparameters(ignore=["teacher_decay"])
        self.lr, self.use_all_parameters, self.fail_in_validation_at = lr, use_all_parameters, fail_in_validation_at
        torch.manual_seed(0)
        self.student = make_net()
        self.seen: dict[str, list[dict[str, Any]]] = {"train": [], "validate": [], "test": []}
        self.validation_calls = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.seen["train"].append({"teacher_training": self.teacher.training, "student_training": self.training})
        with torch.no_grad():
            targets = self.teacher(x).softmax(dim=1)
        logits = self.student(x)
        return nn.functional.cross_entropy(logits, y) + nn.functional.mse_loss(logits.softmax(dim=1), targets)

    def _record(self, stage: str, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen[stage].append(
                {
                    "step": self.trainer.global_step,
                    "student": snapshot(self.student),
                    "teacher": snapshot(self.teacher),
                    "teacher_training": self.teacher.training,
                }
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._record("validate", batch_idx)
        if batch_idx == 0:
            self.validation_calls += 1
            if self.validation_calls == self.fail_in_validation_at:
                raise RuntimeError("boom in validation_step")
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._record("test", batch_idx)
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = self.parameters() if self.use_all_parameters else self.student.parameters()
        return torch.optim.SGD(parameters, lr=self.lr, momentum=0.9)


class StudentRecorder(L.Callback):
    """Snapshots the student after each optimizer step, and the teacher when training starts."""

    def __init__(self) -> None:
        self.initial_teacher: dict[str, Tensor] = {}
        self.initial_step = 0
        self.steps: list[int] = []
        self.states: list[dict[str, Tensor]] = []
        self.optimizer_steps = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_teacher = snapshot(pl_module.teacher)
        self.initial_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step > (self.steps[-1] if self.steps else self.initial_step):
            self.steps.append(trainer.global_step)
            self.states.append(snapshot(pl_module.student))

    def reference(self, decay_at: Any, upto: int | None = None, **kwargs: Any) -> dict[str, Tensor]:
        """The reference teacher after optimizer step ``upto`` (default: the last one)."""
        count = len(self.steps) if upto is None else self.steps.index(upto) + 1
        return reference_ema(
            self.initial_teacher,
            self.steps[:count],
            self.states[:count],
            decay_at,
            initial_step=self.initial_step,
            **kwargs,
        )

    def at(self, step: int) -> dict[str, Tensor]:
        return self.states[self.steps.index(step)]


def fit(
    model: TinyMeanTeacher,
    callbacks: list[L.Callback] | None = None,
    *,
    max_epochs: int = 2,
    ckpt_path: str | Path | None = None,
    **kwargs: Any,
) -> tuple[L.Trainer, StudentRecorder]:
    recorder = StudentRecorder()
    callbacks = [recorder, *(callbacks or [])]
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer = L.Trainer(callbacks=callbacks, max_epochs=max_epochs, **trainer_kwargs(**kwargs))
    trainer.fit(model, make_loader(), make_loader(n=16), ckpt_path=ckpt_path)
    return trainer, recorder


def assert_equal_states(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), f"{name} differs"


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def far_apart(first: dict[str, Tensor], second: dict[str, Tensor], name: str = "0.weight") -> bool:
    return (first[name].double() - second[name].double()).abs().max().item() > 1e-4


# ---------------------------------------------------------------------------------------------- the teacher
def test_assigning_the_student_creates_a_registered_frozen_copy_in_eval_mode() -> None:
    model = TinyMeanTeacher()
    names = list(model.state_dict())
    student_names = [name for name in names if name.startswith("student.")]
    assert student_names and [name.replace("student.", "teacher.", 1) for name in student_names] == [
        name for name in names if name.startswith("teacher.")
    ]
    assert_equal_states(snapshot(model.teacher), snapshot(model.student))
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    assert model.student[0].weight.data_ptr() != model.teacher[0].weight.data_ptr()
    assert not model.teacher.training and model.student.training
    model.train()
    assert not model.teacher.training and model.student.training
    # parameters() and named_parameters() leave the teacher out; freeze/unfreeze do not reach it
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.student.parameters()}
    assert all(name.startswith("student.") for name, _ in model.named_parameters())
    model.freeze()
    model.unfreeze()
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert model(torch.randn(2, 4)).shape == (2, 3)


def test_the_teacher_cannot_be_assigned() -> None:
    model = TinyMeanTeacher()
    with pytest.raises(AttributeError, match="created from `student`"):
        model.teacher = make_net()


@pytest.mark.parametrize(
    ("decay", "decay_at"),
    [(0.9, constant_decay(0.9)), (WarmupDecay(decay=0.95, warmup=5), warmup_decay(0.95, 5))],
    ids=["constant", "warmup"],
)
def test_teacher_is_the_ema_of_the_student_after_each_optimizer_step(decay: Any, decay_at: Any) -> None:
    model = TinyMeanTeacher(teacher_decay=decay)
    trainer, recorder = fit(model, max_epochs=3)
    assert trainer.global_step == 3 * STEPS_PER_EPOCH
    assert recorder.steps == list(range(1, trainer.global_step + 1))
    assert_close_to_reference(snapshot(model.teacher), recorder.reference(decay_at))
    assert far_apart(snapshot(model.teacher), snapshot(model.student))
    # integer buffers are copied, not averaged
    assert torch.equal(model.teacher[1].num_batches_tracked, model.student[1].num_batches_tracked)
    assert model.num_teacher_updates == trainer.global_step


def test_teacher_frozen_and_absent_from_optimizer_with_self_parameters() -> None:
    class GradientCheck(L.Callback):
        def __init__(self) -> None:
            self.checked = 0

        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            assert all(p.grad is not None for p in pl_module.student.parameters())
            assert all(p.grad is None and not p.requires_grad for p in pl_module.teacher.parameters())
            self.checked += 1

    model = TinyMeanTeacher(use_all_parameters=True)
    initial_teacher = snapshot(model.teacher)
    check = GradientCheck()
    trainer, _ = fit(model, [check])
    assert check.checked == trainer.global_step
    (optimizer,) = trainer.optimizers
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.student.parameters()}
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    assert far_apart(snapshot(model.teacher), initial_teacher)  # it moved, by the EMA alone


def test_optimizer_holding_teacher_parameters_is_refused() -> None:
    class Optimizes(TinyMeanTeacher):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            everything = [*self.student.parameters(), *self.teacher.parameters()]
            return torch.optim.SGD(everything, lr=0.1)

    with pytest.raises(RuntimeError, match=r"holds teacher parameters \['teacher\.0\.bias', 'teacher\.0\.weight'"):
        fit(Optimizes())


@pytest.mark.parametrize(("accumulate", "every_n", "start_step"), [(3, 1, 0), (2, 3, 0), (1, 4, 5), (4, 2, 3)])
def test_update_policy_under_accumulation_every_n_steps_and_start_step(
    accumulate: int, every_n: int, start_step: int
) -> None:
    model = TinyMeanTeacher(teacher_decay=0.8, every_n_steps=every_n, start_step=start_step)
    trainer, recorder = fit(model, max_epochs=3, accumulate_grad_batches=accumulate)
    steps_per_epoch = -(-STEPS_PER_EPOCH // accumulate)
    assert trainer.global_step == recorder.optimizer_steps == 3 * steps_per_epoch
    assert recorder.steps == list(range(1, trainer.global_step + 1))
    assert model.num_teacher_updates == sum(1 for t in recorder.steps if t % every_n == 0)
    expected = recorder.reference(constant_decay(0.8), every_n_steps=every_n, start_step=start_step)
    assert_close_to_reference(snapshot(model.teacher), expected)


@pytest.mark.parametrize("buffers", ["copy", "ignore"])
def test_buffer_options(buffers: str) -> None:
    model = TinyMeanTeacher(teacher_decay=0.8, buffers=buffers)
    initial = snapshot(model.teacher)
    _, recorder = fit(model)
    teacher = snapshot(model.teacher)
    buffer_names = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    parameters = [name for name in initial if name not in buffer_names]
    expected = recorder.reference(constant_decay(0.8), names=parameters)
    assert_close_to_reference(teacher, expected)
    source = recorder.states[-1] if buffers == "copy" else initial
    for name in buffer_names:
        assert torch.equal(teacher[name], source[name]), name


def test_teacher_decay_is_logged() -> None:
    model = TinyMeanTeacher(teacher_decay=WarmupDecay(decay=0.99, warmup=10))
    trainer, _ = fit(model, max_epochs=1)
    t = trainer.global_step
    assert trainer.callback_metrics["teacher/decay"].item() == pytest.approx(min(0.99, (1 + t) / (10 + t)))


def test_nonfinite_student_weights_are_refused() -> None:
    class Diverges(TinyMeanTeacher):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if self.global_step == 2 else loss

    with pytest.raises(NonFiniteUpdateError, match="hold NaN or infinity at optimizer step 3"):
        fit(Diverges())


# ---------------------------------------------------------------------------------------------- modes and hooks
@pytest.mark.parametrize("teacher_mode", ["eval", "train"])
def test_teacher_mode(teacher_mode: str) -> None:
    model = TinyMeanTeacher(teacher_mode=teacher_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, num_sanity_val_steps=1)
    assert not [w for w in caught if "eval mode" in str(w.message)], "Lightning saw an unexpected eval module"
    assert {entry["student_training"] for entry in model.seen["train"]} == {True}
    assert {entry["teacher_training"] for entry in model.seen["train"]} == {teacher_mode == "train"}
    assert {entry["teacher_training"] for entry in model.seen["validate"]} == {False}
    assert model.teacher.training == (teacher_mode == "train") and model.student.training


def test_overriding_on_train_batch_end_without_super_is_detected() -> None:
    class Forgets(TinyMeanTeacher):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            pass

    with pytest.raises(RuntimeError, match=re.escape("must call super().on_train_batch_end")):
        fit(Forgets())


def test_missing_student_is_explained() -> None:
    class NoStudent(MeanTeacherModule):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            raise AssertionError("not reached")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(RuntimeError, match=re.escape("assign `self.student = ...`")):
        L.Trainer(max_epochs=1, **trainer_kwargs()).fit(NoStudent(), make_loader())


BAD_ARGUMENTS = [
    ("teacher_decay", 1.0),
    ("teacher_decay", -0.1),
    ("teacher_decay", "0.99"),
    ("teacher_decay", None),
    ("every_n_steps", 0),
    ("every_n_steps", 1.5),
    ("start_step", -1),
    ("buffers", "mean"),
    ("teacher_mode", "training"),
    ("teacher_mode", None),
    ("evaluate", "ema"),
    ("nonfinite", "warn"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_bad_argument_names_argument_and_value(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")) as info:
        MeanTeacherModule(**{name: value})  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("evaluate", ["teacher", "student"])
def test_validation_and_test_see_the_chosen_weights_and_the_student_comes_back_bit_exactly(evaluate: str) -> None:
    class CheckStudentAfterValidation(L.Callback):
        """Before each training batch that follows a validation, the student must be its raw self again."""

        def __init__(self, recorder: StudentRecorder) -> None:
            self.recorder = recorder
            self.compared = 0
            self.pending = False

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.pending = not trainer.sanity_checking

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            if self.pending:
                assert_equal_states(snapshot(pl_module.student), self.recorder.at(trainer.global_step))
                self.pending = False
                self.compared += 1

    model = TinyMeanTeacher(teacher_decay=0.7, evaluate=evaluate)
    recorder = StudentRecorder()
    check = CheckStudentAfterValidation(recorder)
    trainer = L.Trainer(callbacks=[recorder, check], max_epochs=3, **trainer_kwargs(val_check_interval=4))
    trainer.fit(model, make_loader(), make_loader(n=16))
    assert check.compared == 5  # 6 validations, the last one with no training after it
    validations = model.seen["validate"]
    assert [entry["step"] for entry in validations] == [4, 8, 12, 16, 20, 24]
    for entry in validations:
        raw = recorder.at(entry["step"])
        assert_close_to_reference(entry["teacher"], recorder.reference(constant_decay(0.7), upto=entry["step"]))
        if evaluate == "teacher":
            assert_equal_states(entry["student"], entry["teacher"])
            assert far_apart(entry["student"], raw)
        else:
            assert_equal_states(entry["student"], raw)
    assert_equal_states(snapshot(model.student), recorder.states[-1])

    trainer.test(model, make_loader(n=16), verbose=False)
    (tested,) = model.seen["test"]
    assert_equal_states(tested["student"], snapshot(model.teacher) if evaluate == "teacher" else recorder.states[-1])
    assert_equal_states(snapshot(model.student), recorder.states[-1])
    assert model.student[0].weight.data_ptr() != model.teacher[0].weight.data_ptr()


def test_exception_in_validation_step_restores_the_student_bit_exactly() -> None:
    model = TinyMeanTeacher(teacher_decay=0.7, fail_in_validation_at=2)
    recorder = StudentRecorder()
    trainer = L.Trainer(callbacks=[recorder], max_epochs=3, **trainer_kwargs())
    with pytest.raises(RuntimeError, match="boom in validation_step"):
        trainer.fit(model, make_loader(), make_loader(n=16))
    failed = model.seen["validate"][-1]
    assert failed["step"] == 2 * STEPS_PER_EPOCH and recorder.steps[-1] == failed["step"]
    assert_equal_states(failed["student"], failed["teacher"])  # the teacher was in when it failed
    assert_equal_states(snapshot(model.student), recorder.states[-1])
    assert_close_to_reference(snapshot(model.teacher), recorder.reference(constant_decay(0.7)))
    for student, teacher in zip(model.student.state_dict().values(), model.teacher.state_dict().values(), strict=True):
        assert student.data_ptr() != teacher.data_ptr()


def test_checkpoints_written_during_validation_hold_student_and_teacher_under_their_names(tmp_path: Path) -> None:
    model = TinyMeanTeacher(teacher_decay=0.7)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", monitor="val_loss", save_top_k=-1, save_on_train_epoch_end=False
    )
    _, recorder = fit(model, [checkpoint], max_epochs=2)
    files = sorted(tmp_path.glob("step=*.ckpt"))
    assert [path.name for path in files] == ["step=16.ckpt", "step=8.ckpt"]
    for path in files:
        step = int(path.stem.split("=")[1])
        saved = load(path)
        assert_equal_states(prefixed(saved["state_dict"], "student."), recorder.at(step))
        teacher = prefixed(saved["state_dict"], "teacher.")
        assert_close_to_reference(teacher, recorder.reference(constant_decay(0.7), upto=step))
        assert far_apart(teacher, recorder.at(step))
        assert saved["mean_teacher"]["num_updates"] == saved["mean_teacher"]["last_update_step"] == step


# ---------------------------------------------------------------------------------------------- checkpoints
def test_load_from_checkpoint_restores_both_without_reinitialising_the_teacher(tmp_path: Path) -> None:
    model = TinyMeanTeacher(teacher_decay=0.9, lr=0.05)
    trainer, _ = fit(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    student, teacher = snapshot(model.student), snapshot(model.teacher)
    assert far_apart(student, teacher)

    loaded = TinyMeanTeacher.load_from_checkpoint(path)
    assert loaded.hparams.lr == 0.05
    assert_equal_states(snapshot(loaded.student), student)
    assert_equal_states(snapshot(loaded.teacher), teacher)
    assert all(not p.requires_grad for p in loaded.teacher.parameters())
    assert loaded.num_teacher_updates == trainer.global_step

    # fine-tuning it in a new Trainer starts from the loaded teacher and counts steps from 0 again
    _, recorder = fit(loaded, max_epochs=1)
    assert_equal_states(recorder.initial_teacher, teacher)
    assert_close_to_reference(snapshot(loaded.teacher), recorder.reference(constant_decay(0.9)))


def test_a_schedule_saved_with_the_hyperparameters_loads_with_weights_only(tmp_path: Path) -> None:
    class SavesSchedule(TinyMeanTeacher):
        def __init__(self, teacher_decay: DecaySchedule = WarmupDecay(decay=0.95, warmup=5)) -> None:  # noqa: B008
            super().__init__(teacher_decay)
            self.save_hyperparameters()

    trainer, _ = fit(SavesSchedule(), max_epochs=1)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert load(path)["hyper_parameters"]["teacher_decay"] == WarmupDecay(decay=0.95, warmup=5)
    assert SavesSchedule.load_from_checkpoint(path).teacher_schedule == WarmupDecay(decay=0.95, warmup=5)
    resumed = SavesSchedule()
    trainer, _ = fit(resumed, max_epochs=2, ckpt_path=path)
    assert resumed.num_teacher_updates == trainer.global_step == 2 * STEPS_PER_EPOCH


RESUME_CASES = {
    "constant": (dict(teacher_decay=0.9), {}),
    "every3-accumulate2-start5": (
        dict(teacher_decay=0.9, every_n_steps=3, start_step=5),
        {"accumulate_grad_batches": 2},
    ),
    "warmup-schedule": (dict(teacher_decay=WarmupDecay(decay=0.99, warmup=10)), {}),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path: Path, case: str) -> None:
    options, kwargs = RESUME_CASES[case]
    steps_per_epoch = STEPS_PER_EPOCH // kwargs.get("accumulate_grad_batches", 1)

    model_a = TinyMeanTeacher(**options)
    trainer_a, _ = fit(model_a, max_epochs=4, **kwargs)
    assert trainer_a.global_step == 4 * steps_per_epoch

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(TinyMeanTeacher(**options), [checkpoint, CrashAtEpochStart(2)], max_epochs=4, **kwargs)
    last = tmp_path / "last.ckpt"
    saved = load(last)
    assert saved["global_step"] == 2 * steps_per_epoch
    if case.startswith("every3"):
        # the checkpoint falls between two updates: the last one was at step 6
        assert saved["mean_teacher"]["last_update_step"] == 6

    model_c = TinyMeanTeacher(**options)
    _, recorder_c = fit(model_c, max_epochs=4, ckpt_path=last, **kwargs)
    # the teacher went on from the checkpoint's teacher, not from the student
    assert_equal_states(recorder_c.initial_teacher, prefixed(saved["state_dict"], "teacher."))
    assert far_apart(recorder_c.initial_teacher, prefixed(saved["state_dict"], "student."))
    assert model_c.num_teacher_updates == model_a.num_teacher_updates
    assert_equal_states(snapshot(model_c), snapshot(model_a))


# ---------------------------------------------------------------------------------------------- together with others
def test_works_with_ema_callback() -> None:
    model = TinyMeanTeacher(teacher_decay=0.9)
    callback = EMACallback(decay=0.8, evaluate="raw")
    trainer, recorder = fit(model, [callback], max_epochs=2, num_sanity_val_steps=1)
    ema = callback.ema_state_dict()
    assert not [name for name in ema if name.startswith("teacher.")], "the callback averaged the teacher again"
    assert_close_to_reference(prefixed(ema, "student."), recorder.reference(constant_decay(0.8)))
    assert_close_to_reference(snapshot(model.teacher), recorder.reference(constant_decay(0.9)))
    assert model.num_teacher_updates == callback.num_updates == trainer.global_step
    assert_equal_states(snapshot(model.student), recorder.states[-1])


def test_ema_callback_evaluating_over_the_teacher_is_refused() -> None:
    with pytest.raises(ValueError, match=r"evaluates its teacher.*evaluate='raw'.*evaluate='student'"):
        fit(TinyMeanTeacher(teacher_decay=0.9), [EMACallback(decay=0.8)], max_epochs=1)


class CliMeanTeacher(TinyMeanTeacher):
    """What LightningCLI configures: the teacher's decay, given as a float or a schedule ``class_path``."""

    def __init__(self, teacher_decay: float | DecaySchedule = 0.9, every_n_steps: int = 1, lr: float = 0.1) -> None:
        super().__init__(teacher_decay, lr=lr, every_n_steps=every_n_steps)

    def train_dataloader(self) -> Any:
        return make_loader()


def test_lightning_cli_configures_the_teacher_schedule_from_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  teacher_decay:
    class_path: lightning_ema.schedules.WarmupDecay
    init_args:
      decay: 0.95
      warmup: 5
  every_n_steps: 2
  lr: 0.05
"""
    )
    cli = LightningCLI(CliMeanTeacher, args=["fit", "--config", str(config)], run=True, save_config_callback=None)
    model = cli.model
    assert isinstance(model, CliMeanTeacher)
    assert model.teacher_schedule == WarmupDecay(decay=0.95, warmup=5)
    assert cli.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert model.num_teacher_updates == cli.trainer.global_step // 2


# ---------------------------------------------------------------------------------------------- the example
def test_semi_supervised_example_prints_the_table_and_writes_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import semi_supervised

    out = tmp_path / "plot.png"
    result = semi_supervised.main(["--epochs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    for row in ("supervised only (baseline)", "mean teacher: student", "mean teacher: teacher"):
        assert re.search(rf"{re.escape(row)}\s+[01]\.\d{{4}}\s+[01]\.\d{{4}}", printed), printed
    assert "144 of 1438 training labels" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(0.0 < result[key] <= 1.0 for key in ("baseline_acc", "student_acc", "teacher_acc"))
