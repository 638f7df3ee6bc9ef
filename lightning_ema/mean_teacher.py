"""``MeanTeacherModule``: a LightningModule base whose ``teacher`` is the EMA of its ``student``.

The EMA math and the step policy are :class:`~lightning_ema.EMA`'s, created with the teacher as its target, so
that the teacher's own tensors are the averages and nothing else is allocated. This module only adds the Lightning
hooks and the rules that keep the teacher out of optimizers; the teacher's EMA and bookkeeping are in ``_teacher``,
the callback that restores the student after an exception and checks that the hooks ran in ``_teacher_guard``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import Self, override

from lightning_ema import _teacher
from lightning_ema._teacher_guard import GuardedModule
from lightning_ema._validate import check_bool, check_choice
from lightning_ema.ema import EMA, BufferPolicy, DecayPer, EMAConfig, IntegerBufferPolicy, NonFinitePolicy
from lightning_ema.schedules import (
    ConstantDecay,
    CosineDecay,
    DecaySchedule,
    ExponentialRampDecay,
    HalfLifeDecay,
    KarrasDecay,
    MomentumWarmupDecay,
    PowerDecay,
    WarmupDecay,
    as_schedule,
)

__all__ = ["MeanTeacherModule"]

# A subclass's `save_hyperparameters()` puts a `teacher_decay` schedule into every checkpoint, and Lightning
# loads checkpoints with torch's default `weights_only=True`: allow the built-in schedules, which hold plain
# numbers only, so that resume and `load_from_checkpoint` work without `weights_only=False`.
torch.serialization.add_safe_globals(
    [
        ConstantDecay,
        CosineDecay,
        ExponentialRampDecay,
        HalfLifeDecay,
        KarrasDecay,
        MomentumWarmupDecay,
        PowerDecay,
        WarmupDecay,
    ]
)


class MeanTeacherModule(GuardedModule):
    """A LightningModule whose ``teacher`` is an exponential moving average of its ``student``.

    For Mean Teacher (Tarvainen & Valpola, 2017) and momentum encoders (BYOL, DINO). Assigning ``self.student`` in
    ``__init__`` creates ``self.teacher``: a frozen deep copy, saved and restored with the module (``teacher.*``),
    left out of ``self.parameters()`` and of optimizers, in eval mode unless ``teacher_mode="train"``, and updated
    after every optimizer step: ``teacher = decay_t * teacher + (1 - decay_t) * student`` (logged as
    ``teacher/decay``). Validation and test run with the teacher's weights in the student, so that ``self(x)``
    evaluates the teacher; prediction runs the student. Overrides of ``on_train_start``, ``on_train_batch_end``,
    ``on_{validation,test}_model_{eval,train}``, ``on_save_checkpoint``, ``on_load_checkpoint`` and ``train`` must
    call ``super()``: a missed teacher update or a swap left in place raises a ``RuntimeError``. The README's "Mean
    teacher" section has the details (checkpoints, evaluation, an ``EMACallback`` alongside, DDP, precision).

    Args:
        teacher_decay: a float in [0, 1) or a schedule from :mod:`lightning_ema.schedules`; the update after
            optimizer step ``t`` uses ``teacher_decay(t)``.
        every_n_steps: update after every n-th optimizer step, applying the product of those n steps' decays.
        start_step: the first ``start_step`` optimizer steps copy the student into the teacher.
        buffers: ``"average"`` the student's floating-point buffers (integer ones are copied), ``"copy"`` or
            ``"ignore"`` them (the teacher keeps the buffers it was created with; evaluating it uses the student's).
        teacher_mode: ``"eval"`` keeps the teacher in eval mode; ``"train"`` lets it follow the module's mode.
        evaluate: the weights validation and test run with: ``"teacher"`` or ``"student"``.
        nonfinite: an update meeting a NaN or infinite student weight raises
            :class:`~lightning_ema.NonFiniteUpdateError` (``"error"``), is skipped with a warning (``"skip"``),
            or is not checked (``"ignore"``).
        phase, count_from_start, decay_per, buffer_decay, integer_buffers: how updates are counted and applied,
            as for :class:`~lightning_ema.EMA`; :func:`lightning_ema.compat.mean_teacher_hook_args` sets them to
            reproduce mmdet's ``MeanTeacherHook``.
        copy_student_at_start: when ``fit`` starts at optimizer step 0, first copy the student into the teacher,
            so that student weights loaded after construction (a pretrained backbone) reach it, as mmdet does.

    Raises:
        ValueError: if an argument is invalid; the message names the argument and its value.

    Example::

        class SemiSupervised(MeanTeacherModule):
            def __init__(self):
                super().__init__(teacher_decay=0.999)
                self.student = Net()

            def training_step(self, batch, batch_idx):
                with torch.no_grad():
                    target = self.teacher(batch).softmax(dim=1)
                return consistency_loss(self.student(batch), target)
    """

    #: ``state_dict`` patterns that an :class:`~lightning_ema.EMACallback` must not average: the teacher is
    #: already an average, updated by this module.
    ema_exclude: ClassVar[tuple[str, ...]] = ("teacher.*",)

    student: nn.Module
    teacher: nn.Module

    def __init__(
        self,
        teacher_decay: float | DecaySchedule = 0.999,
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        buffers: BufferPolicy = "average",
        teacher_mode: str = "eval",
        evaluate: str = "teacher",
        nonfinite: NonFinitePolicy = "error",
        phase: int = 0,
        count_from_start: bool = False,
        decay_per: DecayPer = "step",
        buffer_decay: float | DecaySchedule | None = None,
        integer_buffers: IntegerBufferPolicy = "copy",
        copy_student_at_start: bool = False,
    ) -> None:
        super().__init__()
        config = EMAConfig.create(
            as_schedule(teacher_decay, "teacher_decay"),
            every_n_steps=every_n_steps,
            start_step=start_step,
            buffers=buffers,
            nonfinite=nonfinite,
            phase=phase,
            count_from_start=count_from_start,
            decay_per=decay_per,
            buffer_decay=buffer_decay,
            integer_buffers=integer_buffers,
        )
        self.copy_student_at_start = check_bool("copy_student_at_start", copy_student_at_start)
        self.teacher_mode = check_choice("teacher_mode", teacher_mode, ("eval", "train"))
        self.evaluate = check_choice("evaluate", evaluate, ("teacher", "student"))
        self._teacher_run = _teacher.TeacherRun(config)

    # ------------------------------------------------------------------ the teacher
    @override
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":
            raise AttributeError(
                "`teacher` is created from `student`: assign `self.student = ...` and the teacher follows."
            )
        if name == "student" and isinstance(value, nn.Module) and "_teacher_run" in self.__dict__:
            self._teacher_run.forget_student()
            super().__setattr__(name, value)
            super().__setattr__("teacher", _teacher.frozen_copy(value, self._teacher_training(self.training)))
            return
        super().__setattr__(name, value)

    def _teacher_training(self, module_training: bool) -> bool:
        return module_training and self.teacher_mode == "train"

    def _put_teacher_in_mode(self) -> None:
        teacher = self._modules.get("teacher")
        if teacher is not None:
            teacher.train(self._teacher_training(self.training))

    @property
    def teacher_schedule(self) -> DecaySchedule:
        """The teacher's decay schedule (a float ``teacher_decay`` becomes a ``ConstantDecay``)."""
        return self._teacher_run.config.schedules[0]

    @property
    def num_teacher_updates(self) -> int:
        """How many times the teacher was updated (copies during ``start_step`` included), checkpoints included."""
        return self._teacher_run.num_updates

    @property
    def ema_evaluates_own_average(self) -> bool:
        """Whether validation and test run with the teacher (an average already; an EMACallback must not swap)."""
        return self.evaluate == "teacher"

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the student (which holds the teacher's weights while validation or test evaluates the teacher)."""
        return self.student(*args, **kwargs)

    @override
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield the parameters of everything but the teacher, so that optimizers built from them leave it out."""
        yield from _teacher.without_teacher(super().named_parameters(prefix, recurse, remove_duplicate), self._modules)

    @override
    def train(self, mode: bool = True) -> Self:
        """Set the training mode; the teacher stays in eval mode unless ``teacher_mode="train"``."""
        super().train(mode)
        self._put_teacher_in_mode()
        return self

    # ------------------------------------------------------------------ binding and checks
    def _ensure_bound(self) -> EMA:
        """Create the teacher's EMA (the teacher is its storage), or re-pair it after a device move or load."""
        teacher = _teacher.require_teacher(self._modules, type(self).__name__)
        return self._teacher_run.bind(self.student, teacher, self.trainer.global_step)

    @override
    def _restore_student(self) -> None:
        """Put the student's own weights back, whatever the swap depth, and the teacher in its mode."""
        self._teacher_run.restore_student()
        self._put_teacher_in_mode()

    # ------------------------------------------------------------------ training hooks
    @override
    def on_fit_start(self) -> None:
        """Let the teacher's mode flag follow the module until training starts, so Lightning sees no eval module."""
        # Lightning warns about modules in eval mode right before `on_train_start`; the teacher's eval mode is
        # intended, so it is applied in `on_train_start` instead. The sanity check runs everything in eval mode.
        teacher = _teacher.require_teacher(self._modules, type(self).__name__)
        teacher.train(self.training)

    @override
    def on_train_start(self) -> None:
        """Bind the teacher's EMA, check that no optimizer holds the teacher and put the teacher in its mode."""
        ema = self._ensure_bound()
        if self.copy_student_at_start and self.trainer.global_step == 0:
            ema.copy_from_module()
        _teacher.check_optimizers(self.teacher, self.trainer.optimizers)  # bound: the teacher exists
        self._put_teacher_in_mode()
        self._teacher_run.seen_step = self.trainer.global_step

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the teacher if an optimizer step due for an update happened in this batch; log the decay."""
        decay = self._teacher_run.update(self.student, self.trainer.global_step, type(self).__name__)
        if decay is not None:
            self.log("teacher/decay", decay, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_train_end(self) -> None:
        """Give every rank rank 0's teacher buffers; forget this run's step bookkeeping (the counters stay)."""
        self._teacher_run.end_training()

    # ------------------------------------------------------------------ evaluation hooks
    def _begin_evaluation(self, set_eval_mode: Callable[[], None]) -> None:
        # Lightning restores each submodule's mode after evaluation unless `on_*_model_train` is overridden, as
        # it is here; so the modes are captured here and restored afterwards, the way Lightning does it.
        self._teacher_run.captured_modes = _teacher.capture_modes(self)
        set_eval_mode()
        self._teacher_run.begin_evaluation(self._ensure_bound(), swap_in=self.evaluate == "teacher")

    @override
    def on_validation_model_eval(self) -> None:
        """Put the module in eval mode and, with ``evaluate="teacher"``, the teacher's weights into the student."""
        self._begin_evaluation(super().on_validation_model_eval)

    @override
    def on_validation_model_train(self) -> None:
        """Give the student its own weights back and restore each submodule's mode."""
        self._teacher_run.end_evaluation(self, swapped_in=self.evaluate == "teacher")

    @override
    def on_test_model_eval(self) -> None:
        """Put the module in eval mode and, with ``evaluate="teacher"``, the teacher's weights into the student."""
        self._begin_evaluation(super().on_test_model_eval)

    @override
    def on_test_model_train(self) -> None:
        """Give the student its own weights back and restore each submodule's mode."""
        self._teacher_run.end_evaluation(self, swapped_in=self.evaluate == "teacher")

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the teacher's counters; keep the student's own weights under ``student.*`` during a swap."""
        trainer = self._trainer
        self._teacher_run.save(checkpoint, -1 if trainer is None else trainer.global_step)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the teacher's counters (the teacher's weights come with the module's ``state_dict``)."""
        details = self._teacher_run.load(checkpoint)
        if details:
            rank_zero_warn(
                f"Loading a teacher saved with a different configuration ({details}); it continues with the new"
                " settings.",
                category=UserWarning,
            )
