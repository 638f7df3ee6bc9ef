"""When an EMA updates and with which decay: a pure function of the optimizer-step counts.

An update is due when a multiple of ``every_n_steps`` lies in ``(last_update_step, step]``. Steps up to
``start_step`` copy the weights; later ones average with the product of the per-step decays of the steps the
update covers, so the EMA's time constant in optimizer steps does not depend on ``every_n_steps``.
"""

from __future__ import annotations

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

    def is_due(self, last_update_step: int, step: int) -> bool:
        """Whether an update is due at ``step`` after the last one at ``last_update_step``.

        Example:
            >>> from lightning_ema.schedules import ConstantDecay
            >>> policy = StepPolicy((ConstantDecay(0.9),), every_n_steps=3)
            >>> [policy.is_due(0, step) for step in (1, 2, 3)], policy.is_due(3, 5), policy.is_due(3, 7)
            ([False, False, True], False, True)
        """
        n = self.every_n_steps
        return step // n > last_update_step // n

    def copies(self, step: int) -> bool:
        """Whether the update at ``step`` copies the weights instead of averaging them."""
        return step <= self.start_step

    def weights(self, last_update_step: int, step: int) -> list[float]:
        """Return ``1 - decay`` per EMA for an update at ``step`` covering the steps after ``last_update_step``.

        The decay is the product of the per-step decays of the covered steps (from the first step after
        ``start_step``).

        Example:
            >>> from lightning_ema.schedules import ConstantDecay
            >>> [round(w, 6) for w in StepPolicy((ConstantDecay(0.9),)).weights(0, 2)]
            [0.19]
        """
        first = max(last_update_step, self.start_step) + 1
        return [1.0 - schedule.interval_decay(first, step) for schedule in self.schedules]

    def decays_at(self, step: int) -> tuple[float, ...]:
        """The per-step decay of each EMA at ``step`` (what is logged as ``ema/decay``)."""
        return tuple(schedule(step) for schedule in self.schedules)

    def describe(self) -> Sequence[str]:
        """The schedules as text, one per EMA."""
        return [repr(schedule) for schedule in self.schedules]
