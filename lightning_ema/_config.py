"""The validated settings of an EMA (``EMAConfig``) and the names of their choices; torch only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_ema._policy import StepPolicy
from lightning_ema._validate import check_bool, check_choice, check_int, parse_device, parse_dtype, parse_patterns
from lightning_ema.schedules import DecaySchedule, as_schedule

__all__ = ["BufferPolicy", "Decay", "DecayPer", "EMAConfig", "IntegerBufferPolicy", "NonFinitePolicy", "as_schedules"]

BufferPolicy = Literal["average", "copy", "ignore"]
NonFinitePolicy = Literal["error", "skip", "ignore"]
IntegerBufferPolicy = Literal["copy", "average", "keep"]
DecayPer = Literal["step", "update"]
Decay = float | DecaySchedule | Sequence[float | DecaySchedule]
#: The dtypes an EMA can be kept in: those with a (multi-tensor) lerp.
_EMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_schedules(decay: Any, name: str = "decay") -> tuple[DecaySchedule, ...]:
    """Return one schedule per EMA from a float, a schedule, or a non-empty list of distinct ones."""
    if isinstance(decay, (list, tuple)):
        if not decay:
            raise ValueError(f"`{name}` must be a float, a schedule or a non-empty list of them, got {decay!r}.")
        schedules = tuple(as_schedule(item, name) for item in decay)
        if len({repr(schedule) for schedule in schedules}) != len(schedules):
            raise ValueError(f"`{name}` must list distinct decays, got {decay!r}.")
        return schedules
    return (as_schedule(decay, name),)


@dataclass(frozen=True)
class EMAConfig:
    """The validated settings of an EMA; :meth:`create` checks every argument and names the bad one."""

    schedules: tuple[DecaySchedule, ...]
    every_n_steps: int = 1
    start_step: int = 0
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    buffers: str = "average"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    nonfinite: str = "error"
    # How other libraries count and apply decays (lightning_ema.compat): defaults keep lightning-ema's own rule.
    phase: int = 0
    count_from_start: bool = False
    decay_per: str = "step"
    buffer_schedule: DecaySchedule | None = None
    integer_buffers: str = "copy"
    stop_step: int | None = None

    @classmethod
    def create(
        cls,
        decay: Decay = 0.9999,
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        buffers: BufferPolicy = "average",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        nonfinite: NonFinitePolicy = "error",
        phase: int = 0,
        count_from_start: bool = False,
        decay_per: DecayPer = "step",
        buffer_decay: float | DecaySchedule | None = None,
        integer_buffers: IntegerBufferPolicy = "copy",
        stop_step: int | None = None,
        decay_name: str = "decay",
    ) -> EMAConfig:
        """Validate the arguments of :class:`EMA` (``decay_name``: how ``decay`` is called in messages).

        Raises:
            ValueError: naming the first invalid argument and its value.
        """
        buffer_policy = check_choice("buffers", buffers, ("average", "copy", "ignore"))
        integer_policy = check_choice("integer_buffers", integer_buffers, ("copy", "average", "keep"))
        if integer_policy != "copy" and buffer_policy != "average":
            raise ValueError(
                f"`integer_buffers` must be 'copy' unless buffers='average' (only averaged buffers have an integer "
                f"policy), got integer_buffers={integer_buffers!r} with buffers={buffers!r}."
            )
        if buffer_decay is not None and buffer_policy != "average":
            raise ValueError(
                f"`buffer_decay` must be None unless buffers='average' (only averaged buffers have a decay), got "
                f"buffer_decay={buffer_decay!r} with buffers={buffers!r}."
            )
        if stop_step is not None:
            stop_step = check_int("stop_step", stop_step, 0)
        ema_dtype = parse_dtype("dtype", dtype)
        if ema_dtype is not None and ema_dtype not in _EMA_DTYPES:
            # float8 and other storage-only dtypes: torch has no lerp for them, the first update would fail.
            raise ValueError(
                f"`dtype` must be None or one of {[str(d) for d in _EMA_DTYPES]} (dtypes torch can average in), "
                f"got {dtype!r}."
            )
        return cls(
            schedules=as_schedules(decay, decay_name),
            every_n_steps=check_int("every_n_steps", every_n_steps, 1),
            start_step=check_int("start_step", start_step, 0),
            device=parse_device("device", device),
            dtype=ema_dtype,
            buffers=buffer_policy,
            include=parse_patterns("include", include),
            exclude=parse_patterns("exclude", exclude),
            nonfinite=check_choice("nonfinite", nonfinite, ("error", "skip", "ignore")),
            phase=check_int("phase", phase, 0),
            count_from_start=check_bool("count_from_start", count_from_start),
            decay_per=check_choice("decay_per", decay_per, ("step", "update")),
            buffer_schedule=None if buffer_decay is None else as_schedule(buffer_decay, "buffer_decay"),
            integer_buffers=integer_policy,
            stop_step=stop_step,
        )

    @property
    def policy(self) -> StepPolicy:
        """The step rule of these settings."""
        return StepPolicy(
            self.schedules,
            self.every_n_steps,
            self.start_step,
            phase=self.phase,
            count_from_start=self.count_from_start,
            decay_per=self.decay_per,
            buffer_schedule=self.buffer_schedule,
            stop_step=self.stop_step,
        )

    def describe(self) -> dict[str, Any]:
        """The settings as plain values (saved with checkpoints, compared on resume)."""
        return {
            "decays": [repr(schedule) for schedule in self.schedules],
            "every_n_steps": self.every_n_steps,
            "start_step": self.start_step,
            "device": None if self.device is None else str(self.device),
            "dtype": None if self.dtype is None else str(self.dtype),
            "buffers": self.buffers,
            "include": None if self.include is None else list(self.include),
            "exclude": None if self.exclude is None else list(self.exclude),
            **self.step_rule_changes(),
        }

    def step_rule_changes(self) -> dict[str, Any]:
        """The step-rule settings that differ from the defaults, as plain values.

        Only those are described, so that checkpoints written before these settings existed compare equal.
        """
        return {key: value for key, value in self._step_rule().items() if value != _STEP_RULE_DEFAULTS[key]}

    def _step_rule(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "count_from_start": self.count_from_start,
            "decay_per": self.decay_per,
            "buffer_decay": None if self.buffer_schedule is None else repr(self.buffer_schedule),
            "integer_buffers": self.integer_buffers,
            "stop_step": self.stop_step,
        }


_STEP_RULE_DEFAULTS: dict[str, Any] = {
    "phase": 0,
    "count_from_start": False,
    "decay_per": "step",
    "buffer_decay": None,
    "integer_buffers": "copy",
    "stop_step": None,
}
