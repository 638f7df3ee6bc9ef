"""When an EMA updates and with which decay: a pure function of the optimizer-step counts.

By default an update is due when a multiple of ``every_n_steps`` lies in ``(last_update_step, step]``. Steps up to
``start_step`` copy the weights; later ones average with the product of the per-step decays of the steps the
update covers, so the EMA's time constant in optimizer steps does not depend on ``every_n_steps``.

Options that other libraries' rules need, each general:

- ``phase``: updates fall on the steps ``t`` with ``t % every_n_steps == phase % every_n_steps``;
- ``count_from_start``: the EMA's clock starts at ``start_step``: every step up to it copies the weights, update
  intervals count from it, and the schedule sees the steps since it (the first averaging update gets ``decay(1)``);
- ``decay_per="update"``: each update applies the schedule's decay once, whatever the steps it covers;
- ``buffer_schedule``: another decay for the averaged buffers;
- ``stop_step``: no update after this step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_ema.schedules import DecaySchedule

__all__ = ["StepPolicy"]


@dataclass(frozen=True)
class StepPolicy:
    """The update rule of one EMA (or several, one schedule each) in optimizer steps."""

    schedules: tuple[DecaySchedule, ...]
    every_n_steps: int = 1
    start_step: int = 0
    phase: int = 0
    count_from_start: bool = False
    decay_per: str = "step"
    buffer_schedule: DecaySchedule | None = None
    stop_step: int | None = None

    @property
    def _origin(self) -> int:
        """The step the schedules and intervals count from."""
        return self.start_step if self.count_from_start else 0

    def is_due(self, last_update_step: int, step: int) -> bool:
        """Whether an update is due at ``step`` after the last one at ``last_update_step``.

        Example:
            >>> from lightning_ema.schedules import ConstantDecay
            >>> policy = StepPolicy((ConstantDecay(0.9),), every_n_steps=3)
            >>> [policy.is_due(0, step) for step in (1, 2, 3)], policy.is_due(3, 5), policy.is_due(3, 7)
            ([False, False, True], False, True)
            >>> mmcv = StepPolicy((ConstantDecay(0.9),), every_n_steps=3, phase=1)
            >>> [step for step in range(1, 9) if mmcv.is_due(step - 1, step)]
            [1, 4, 7]
            >>> clock = StepPolicy((ConstantDecay(0.9),), every_n_steps=3, start_step=4, count_from_start=True)
            >>> [step for step in range(1, 12) if clock.is_due(step - 1, step)]
            [1, 2, 3, 4, 7, 10]
        """
        if self.stop_step is not None and step > self.stop_step:
            return False
        if self.count_from_start and step <= self.start_step:
            return step > last_update_step
        n, offset = self.every_n_steps, self._origin + self.phase
        since = max(last_update_step, self.start_step) if self.count_from_start else last_update_step
        return (step - offset) // n > (since - offset) // n

    def copies(self, step: int) -> bool:
        """Whether the update at ``step`` copies the weights instead of averaging them."""
        return step <= self.start_step

    def _decay(self, schedule: DecaySchedule, last_update_step: int, step: int) -> float:
        origin = self._origin
        if self.decay_per == "update":
            return schedule(step - origin)
        first = max(last_update_step, self.start_step) + 1
        return schedule.interval_decay(first - origin, step - origin)

    def weights(self, last_update_step: int, step: int) -> list[float]:
        """Return ``1 - decay`` per EMA for an update at ``step`` covering the steps after ``last_update_step``.

        With ``decay_per="step"`` the decay is the product of the per-step decays of the covered steps (from the
        first step after ``start_step``); with ``decay_per="update"`` it is the schedule's decay at ``step``.

        Example:
            >>> from lightning_ema.schedules import ConstantDecay
            >>> [round(w, 6) for w in StepPolicy((ConstantDecay(0.9),)).weights(0, 2)]
            [0.19]
            >>> [round(w, 6) for w in StepPolicy((ConstantDecay(0.9),), decay_per="update").weights(0, 2)]
            [0.1]
        """
        return [1.0 - self._decay(schedule, last_update_step, step) for schedule in self.schedules]

    def buffer_weights(self, last_update_step: int, step: int) -> list[float] | None:
        """Return ``1 - decay`` of the averaged buffers per EMA, or ``None`` if they use :meth:`weights`."""
        if self.buffer_schedule is None:
            return None
        return [1.0 - self._decay(self.buffer_schedule, last_update_step, step)] * len(self.schedules)

    def decays_at(self, step: int) -> tuple[float, ...]:
        """The per-step decay of each EMA at ``step`` (what is logged as ``ema/decay``)."""
        return tuple(schedule(step - self._origin) for schedule in self.schedules)

    def share_left(self, step: int, total: int, *, max_updates: int = 100_000) -> list[float] | None:
        """The weight each EMA still gives its value at ``step`` after the updates up to step ``total``.

        ``None`` if no averaging update lies in ``(step, total]``, or (``decay_per="update"``) more than
        ``max_updates`` would have to be walked.

        Example:
            >>> from lightning_ema.schedules import ConstantDecay
            >>> [round(s, 4) for s in StepPolicy((ConstantDecay(0.9),), every_n_steps=2).share_left(0, 4)]
            [0.6561]
            >>> [round(s, 4) for s in StepPolicy((ConstantDecay(0.9),), 2, decay_per="update").share_left(0, 4)]
            [0.81]
        """
        if self.stop_step is not None:
            total = min(total, self.stop_step)
        first = max(step, self.start_step) + 1
        if total < first:
            return None
        if self.decay_per == "step":
            origin = self._origin
            return [schedule.interval_decay(first - origin, total - origin) for schedule in self.schedules]
        n, offset = self.every_n_steps, self._origin + self.phase
        due = offset + ((first - 1 - offset) // n + 1) * n  # the first due step >= first
        if due > total or (total - due) // n >= max_updates:
            return None
        steps = range(due, total + 1, n)
        return [math.prod(schedule(t - self._origin) for t in steps) for schedule in self.schedules]

    def describe(self) -> Sequence[str]:
        """The schedules as text, one per EMA."""
        return [repr(schedule) for schedule in self.schedules]
