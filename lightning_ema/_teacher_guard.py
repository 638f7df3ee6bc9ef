"""The callback that guards a :class:`~lightning_ema.MeanTeacherModule`: restore after an exception, check hooks ran.

A LightningModule has no ``on_exception`` hook, and its hooks can be overridden without ``super()``; a callback has
both covered. ``MeanTeacherModule`` derives from :class:`GuardedModule`, which gives every Trainer that takes the
module a :class:`MeanTeacherGuard` before any hook runs, so that the checks also cover ``validate`` and ``test`` on
their own and the sanity check. The guard knows the module through :class:`GuardedModule` only, so that this module
does not import the one that derives from it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_ema._teacher import TeacherRun

__all__ = ["GuardedModule", "MeanTeacherGuard", "attach_guard"]


class MeanTeacherGuard(Callback):
    """Restores the student after an exception and checks that the module's hooks ran."""

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Raise if the previous optimizer step did not update the teacher or a swap was left in place."""
        _check_hooks_ran(trainer, pl_module, "on_train_batch_start")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if a teacher update was missed before validation, or the teacher should be in but is not."""
        self._check_evaluation(trainer, pl_module, "validation")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if the teacher should be in the student for testing but is not."""
        self._check_evaluation(trainer, pl_module, "test")

    @staticmethod
    def _check_evaluation(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, GuardedModule):
            return
        if stage == "validation" and trainer.state.fn == "fit" and not trainer.sanity_checking:
            _check_hooks_ran(trainer, pl_module, f"on_{stage}_start")
        if pl_module.evaluate == "teacher" and not pl_module._teacher_run.swapped:
            raise RuntimeError(
                f"{type(pl_module).__name__}: {stage} should run with the teacher's weights but they are not in the "
                f"student. An override of `on_{stage}_model_eval` must call super()."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise if the last optimizer steps did not update the teacher."""
        _check_hooks_ran(trainer, pl_module, "on_train_end")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the student its own weights back before anything else looks at the module."""
        if isinstance(pl_module, GuardedModule):
            pl_module._restore_student()


def _check_hooks_ran(trainer: pl.Trainer, pl_module: pl.LightningModule, where: str) -> None:
    """Raise if a teacher update was missed or a swap was left in place (a hook overridden without super)."""
    if isinstance(pl_module, GuardedModule):
        pl_module._teacher_run.check_hooks_ran(type(pl_module).__name__, trainer.global_step, where)


def attach_guard(trainer: pl.Trainer) -> None:
    """Give ``trainer`` a :class:`MeanTeacherGuard` unless it has one."""
    if not any(isinstance(callback, MeanTeacherGuard) for callback in trainer.callbacks):  # type: ignore[attr-defined]
        # Attached here rather than through `configure_callbacks`, which subclasses often override.
        trainer.callbacks.append(MeanTeacherGuard())  # type: ignore[attr-defined]


class GuardedModule(pl.LightningModule):
    """A LightningModule that gives every Trainer it is attached to a :class:`MeanTeacherGuard`.

    Subclasses set ``evaluate`` and ``_teacher_run`` and implement :meth:`_restore_student`: what the guard uses.
    """

    evaluate: str
    _teacher_run: TeacherRun

    def _restore_student(self) -> None:
        """Put the student's own weights back, whatever the swap depth, and the teacher in its mode."""
        raise NotImplementedError

    @property
    @override
    def trainer(self) -> pl.Trainer:
        """The Trainer this module is attached to (see ``LightningModule.trainer``)."""
        return super().trainer

    @trainer.setter
    def trainer(self, trainer: pl.Trainer | None) -> None:
        # Every entry point (`fit`, `validate`, `test`, `predict`) attaches the Trainer before any hook runs.
        pl.LightningModule.trainer.fset(self, trainer)  # type: ignore[attr-defined]
        if trainer is not None:
            attach_guard(trainer)
