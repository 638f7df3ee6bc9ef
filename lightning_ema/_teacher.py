"""The parts of :class:`~lightning_ema.MeanTeacherModule` that need no LightningModule (torch only).

Creating the frozen teacher; :class:`TeacherRun`, which holds the teacher's :class:`~lightning_ema.EMA` (the
teacher is the EMA's storage) and its bookkeeping; the checks that keep the teacher out of optimizers and detect
hooks overridden without ``super()``; capturing and restoring submodule modes around evaluation; and the teacher's
entry in a checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_ema._config import EMAConfig
from lightning_ema._state_keys import config_changes
from lightning_ema.ema import EMA

__all__ = [
    "CHECKPOINT_KEY",
    "TeacherRun",
    "bound_ema",
    "capture_modes",
    "changed_settings",
    "check_hooks_ran",
    "check_optimizers",
    "frozen_copy",
    "keep_student_weights",
    "put_teacher_weights",
    "require_teacher",
    "restore_counters",
    "restore_modes",
    "saved_counters",
    "teacher_settings",
    "without_teacher",
]

#: The checkpoint key under which the teacher's counters and configuration are saved.
CHECKPOINT_KEY = "mean_teacher"


def frozen_copy(student: nn.Module, training: bool) -> nn.Module:
    """Return a deep copy of ``student`` without gradients, in the given mode."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    teacher.train(training)
    return teacher


def require_teacher(modules: Mapping[str, nn.Module | None], owner: str) -> nn.Module:
    """Return ``modules["teacher"]``, or raise a ``RuntimeError`` saying that ``owner`` was given no student."""
    teacher = modules.get("teacher")
    if teacher is None:
        raise RuntimeError(
            f"{owner} has no student: assign `self.student = ...` in `__init__` after "
            "`super().__init__(...)`; the teacher is created from it."
        )
    return teacher


def without_teacher(
    named: Iterable[tuple[str, nn.Parameter]], modules: Mapping[str, nn.Module | None]
) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield the ``named`` parameters that are not parameters of ``modules["teacher"]`` (if there is one)."""
    teacher = modules.get("teacher")
    skip = set() if teacher is None else {id(p) for p in teacher.parameters()}
    for name, parameter in named:
        if id(parameter) not in skip:
            yield name, parameter


def bound_ema(ema: EMA | None, student: nn.Module, teacher: nn.Module, config: EMAConfig, step: int) -> EMA:
    """Return ``ema`` re-paired with the student after a device move or load, or a new one if it is not its EMA."""
    if ema is None or ema.module is not student:
        return EMA.from_config(student, config, step=step, target=teacher)
    ema.refresh()
    return ema


def restore_counters(ema: EMA, counters: tuple[int, int] | None, step: int) -> None:
    """Give ``ema`` the counters restored from a checkpoint, and count its steps from the Trainer's ``step``."""
    if counters is not None:
        ema.num_updates, ema.last_update_step = counters
        ema.count_steps_from(ema.last_update_step)
    if ema.step > step:
        # Counters from another run's step numbering (load_from_checkpoint, then a new Trainer): the teacher
        # is kept and its steps are counted from this Trainer's step on.
        ema.count_steps_from(step)


def check_optimizers(teacher: nn.Module, optimizers: Sequence[Optimizer]) -> None:
    """Raise a ``RuntimeError`` naming the teacher parameters that an optimizer holds."""
    names = {id(p): name for name, p in teacher.named_parameters()}
    for index, optimizer in enumerate(optimizers):
        held = sorted(names[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in names)
        if held:
            raise RuntimeError(
                f"Optimizer {index} ({type(optimizer).__name__}) holds teacher parameters "
                f"{['teacher.' + name for name in held[:5]]}{' ...' if len(held) > 5 else ''}. The teacher is "
                "the EMA of the student and must not be optimised: pass `self.student.parameters()` or "
                "`self.parameters()` (which leaves the teacher out) to the optimizer."
            )


def check_hooks_ran(owner: str, *, swapped: bool, seen_step: int | None, global_step: int, where: str) -> None:
    """Raise if a teacher update was missed or a swap was left in place (a hook overridden without super).

    Args:
        owner: the module's class name, for the message.
        swapped: whether the teacher's weights are in the student.
        seen_step: the optimizer step of the last teacher update; ``None`` before training was set up.
        global_step: the Trainer's optimizer step now.
        where: the hook this is checked in.
    """
    if swapped and where in ("on_train_batch_start", "on_train_end"):
        raise RuntimeError(
            f"{owner}: the teacher's weights are still in the student at {where}. An override of "
            "`on_validation_model_train` or `on_test_model_train` must call super()."
        )
    if seen_step is None:
        if where == "on_train_batch_start":
            raise RuntimeError(
                f"{owner}: training started without the teacher being set up. An override of "
                "`on_train_start` must call super().on_train_start()."
            )
        return
    if global_step > seen_step:
        raise RuntimeError(
            f"{owner}: optimizer step {global_step} happened but the teacher was not "
            f"updated (noticed at {where}). An override of `on_train_batch_end` must call "
            "super().on_train_batch_end(outputs, batch, batch_idx)."
        )


def capture_modes(module: nn.Module) -> dict[str, bool]:
    """Return the training mode of every submodule of ``module`` by name."""
    return {name: submodule.training for name, submodule in module.named_modules()}


def restore_modes(module: nn.Module, modes: Mapping[str, bool] | None) -> None:
    """Give the submodules of ``module`` the modes :func:`capture_modes` returned (``None``: ``train()`` all)."""
    if modes is None:
        module.train()
        return
    for name, submodule in module.named_modules():
        if name in modes:
            submodule.training = modes[name]


def teacher_settings(config: EMAConfig) -> dict[str, Any]:
    """The plain values describing the teacher's configuration, as saved in a checkpoint."""
    return {
        "teacher_decay": repr(config.schedules[0]),
        "every_n_steps": config.every_n_steps,
        "start_step": config.start_step,
        "buffers": config.buffers,
        **config.step_rule_changes(),
    }


def saved_counters(counters: tuple[int, int], config: EMAConfig) -> dict[str, Any]:
    """The teacher's checkpoint entry: its counters and its configuration."""
    return {"num_updates": counters[0], "last_update_step": counters[1], "config": teacher_settings(config)}


def keep_student_weights(checkpoint: Mapping[str, Any], ema: EMA) -> None:
    """Put the student's own weights under ``student.*`` in a checkpoint written while the teacher is swapped in."""
    state_dict = checkpoint.get("state_dict")
    if not ema.is_swapped or state_dict is None:
        return
    for name, raw in ema.raw_state_dict().items():
        key = f"student.{name}"
        if key in state_dict:
            state_dict[key] = raw


def put_teacher_weights(checkpoint: Mapping[str, Any], ema: EMA | None) -> None:
    """Write the teacher (the EMA's values) under ``teacher.*`` into a checkpoint's earlier ``state_dict``."""
    state_dict = checkpoint.get("state_dict")
    if ema is None or state_dict is None:
        return
    for name, value in ema.ema_state_dict().items():
        key = f"teacher.{name}"
        if key in state_dict:
            state_dict[key] = value.detach().clone()


def changed_settings(state: Mapping[str, Any], config: EMAConfig) -> str | None:
    """Describe how the configuration saved in the teacher's checkpoint entry differs from ``config``."""
    return config_changes(state.get("config", {}), teacher_settings(config))


class TeacherRun:
    """The teacher's EMA and the bookkeeping that checks the module's hooks ran.

    Attributes:
        config: the teacher's validated settings.
        ema: the teacher's EMA, created when training or evaluation first binds it.
        restored_counters: ``(num_updates, last_update_step)`` loaded from a checkpoint, until the EMA takes them.
        seen_step: the optimizer step of the last teacher update in this ``fit`` (``None`` outside one).
        captured_modes: each submodule's mode before evaluation, restored after it.
        caught_up_decay: the decay of an update applied early, for a checkpoint written between an optimizer step
            and the module's ``on_train_batch_end`` (logged there).
    """

    def __init__(self, config: EMAConfig) -> None:
        self.config = config
        self.ema: EMA | None = None
        self.restored_counters: tuple[int, int] | None = None
        self.seen_step: int | None = None
        self.captured_modes: dict[str, bool] | None = None
        self.caught_up_decay: float | None = None

    @property
    def num_updates(self) -> int:
        """How many times the teacher was updated, checkpoints included."""
        if self.restored_counters is not None:
            return self.restored_counters[0]
        return 0 if self.ema is None else self.ema.num_updates

    @property
    def swapped(self) -> bool:
        """Whether the teacher's weights are in the student."""
        return self.ema is not None and self.ema.is_swapped

    def forget_student(self) -> None:
        """Drop the EMA of a student being replaced (the new one gets a new teacher); refuse while it is swapped."""
        if self.swapped:
            raise RuntimeError("Cannot replace the student while the teacher's weights are swapped into it.")
        self.ema = None

    def bind(self, student: nn.Module, teacher: nn.Module, step: int) -> EMA:
        """Create the EMA, or re-pair it, and give it the counters restored from a checkpoint."""
        ema = self.ema = bound_ema(self.ema, student, teacher, self.config, step)
        counters, self.restored_counters = self.restored_counters, None
        restore_counters(ema, counters, step)
        return ema

    def update(self, student: nn.Module, step: int, owner: str) -> float | None:
        """Update the teacher after optimizer step ``step``; return the decay used (``None``: no update due)."""
        ema = self.ema
        if ema is None or ema.module is not student:
            raise RuntimeError(
                f"{owner}: the teacher was not set up when training started. An override of "
                "`on_train_start` must call super().on_train_start()."
            )
        self.seen_step = step  # first: a refused update is not tried again by `catch_up` when the error is saved
        decay = ema.update(step)
        if self.caught_up_decay is not None:
            decay, self.caught_up_decay = self.caught_up_decay, None
        return decay

    def catch_up(self, step: int) -> bool:
        """Apply the update due after optimizer step ``step`` if ``on_train_batch_end`` has not run yet; say if so.

        Callbacks' ``on_train_batch_end`` run before the module's, so a ``ModelCheckpoint(every_n_train_steps=...)``
        saves between the optimizer step and the teacher's update. Its checkpoint must hold the teacher and the
        counters of that step, or a run resumed from it would never apply the update.
        """
        ema = self.ema
        if ema is None or self.seen_step is None or step <= self.seen_step or ema.is_swapped:
            return False
        self.seen_step = step
        self.caught_up_decay = ema.update(step)
        return self.caught_up_decay is not None

    def end_training(self) -> None:
        """Give every rank rank 0's teacher buffers; forget this run's step bookkeeping (the counters stay)."""
        if self.ema is not None:
            self.ema.take_rank_zero_buffers()
        self.seen_step = None
        self.caught_up_decay = None

    def restore_student(self) -> None:
        """Put the student's own weights back, whatever the swap depth, and forget the captured modes."""
        if self.ema is not None:
            self.ema.swap_out(force=True)
        self.captured_modes = None

    def check_hooks_ran(self, owner: str, global_step: int, where: str) -> None:
        """Raise if a teacher update was missed or a swap was left in place (see :func:`check_hooks_ran`)."""
        check_hooks_ran(owner, swapped=self.swapped, seen_step=self.seen_step, global_step=global_step, where=where)

    def begin_evaluation(self, ema: EMA, swap_in: bool) -> None:
        """Give every rank rank 0's teacher buffers and put the teacher's weights into the student (if ``swap_in``)."""
        ema.take_rank_zero_buffers()  # under DDP each rank averaged its own BatchNorm statistics
        if swap_in:
            ema.swap_in()

    def end_evaluation(self, module: nn.Module, swapped_in: bool) -> None:
        """Give the student its own weights back (if ``swapped_in``) and restore the captured modes."""
        if swapped_in and self.ema is not None:
            self.ema.swap_out()
        modes, self.captured_modes = self.captured_modes, None
        restore_modes(module, modes)

    def save(self, checkpoint: dict[str, Any], step: int) -> None:
        """Save the teacher's counters after optimizer step ``step``; keep ``student.*`` the student's own weights.

        An update due after ``step`` that has not run yet is applied first (see :meth:`catch_up`), and the teacher
        it gave is written under ``teacher.*``.
        """
        if self.catch_up(step):
            put_teacher_weights(checkpoint, self.ema)
        ema = self.ema
        if ema is not None:
            counters: tuple[int, int] | None = (ema.num_updates, ema.last_update_step)
        else:
            counters = self.restored_counters
        if counters is not None:
            checkpoint[CHECKPOINT_KEY] = saved_counters(counters, self.config)
        if ema is not None:
            keep_student_weights(checkpoint, ema)

    def load(self, checkpoint: Mapping[str, Any]) -> str | None:
        """Keep the counters of the teacher's checkpoint entry until the EMA is bound.

        Returns:
            How the configuration saved with the entry differs from this one; ``None`` if it does not, or if
            ``checkpoint`` has no entry.
        """
        state = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(state, dict):
            return None
        self.restored_counters = (int(state["num_updates"]), int(state["last_update_step"]))
        return changed_settings(state, self.config)
