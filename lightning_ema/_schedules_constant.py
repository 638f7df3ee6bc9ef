"""Schedules with one decay for every step: ``ConstantDecay`` and ``HalfLifeDecay``.

Public through :mod:`lightning_ema.schedules`.
"""

from __future__ import annotations

from lightning_ema._schedule_base import (
    _MISSING,
    DecaySchedule,
    _check_interval,
    _check_positive,
    _check_step,
    _check_unit_interval,
    publish,
)


class ConstantDecay(DecaySchedule):
    """The same decay at every step: the classic EMA of weights.

    Used by most EMA implementations without warmup (e.g. timm's ``ModelEmaV2``, ``torch.optim.swa_utils``'s
    ``get_ema_multi_avg_fn``). With a constant decay the average weights step ``t - k`` by
    ``(1 - decay) * decay ** k``, a time constant of about ``1 / (1 - decay)`` steps.

    Args:
        decay: the decay, in ``[0, 1)``.

    >>> schedule = ConstantDecay(decay=0.999)
    >>> schedule(1), schedule(10_000)
    (0.999, 0.999)
    >>> round(schedule.interval_decay(1, 1000), 4)  # share of the initial weights after 1000 steps
    0.3677
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.validate()

    def validate(self) -> None:
        """Check that ``decay`` is in ``[0, 1)`` (see :meth:`DecaySchedule.validate`)."""
        self.decay = _check_unit_interval("decay", getattr(self, "decay", _MISSING))

    def __call__(self, step: int) -> float:
        """Return ``decay`` (see :meth:`DecaySchedule.__call__`)."""
        _check_step(step)
        return self.decay

    def interval_decay(self, first_step: int, last_step: int) -> float:
        """Return ``decay ** n`` for the ``n`` steps of the interval (see the base class)."""
        first, last = _check_interval(first_step, last_step)
        return self.decay ** max(0, last - first + 1)


class HalfLifeDecay(DecaySchedule):
    """A constant decay given by its half-life: the weight of a step halves every ``half_life`` steps.

    ``decay = 0.5 ** (1 / half_life)``. Half-lives are how EMA lengths are often reported, e.g. by
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM, 2022), whose
    EMA is specified by a half-life; this class fixes the half-life in optimizer steps.

    Args:
        half_life: the half-life in optimizer steps, a finite number ``> 0``.

    >>> schedule = HalfLifeDecay(half_life=1000)
    >>> round(schedule(1), 6)
    0.999307
    >>> round(schedule.interval_decay(1, 1000), 6)
    0.5
    >>> schedule
    HalfLifeDecay(half_life=1000.0)
    """

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.validate()

    def validate(self) -> None:
        """Check that ``half_life`` is a finite number ``> 0`` (see :meth:`DecaySchedule.validate`)."""
        self.half_life = _check_positive("half_life", getattr(self, "half_life", _MISSING))

    @property
    def decay(self) -> float:
        """The decay at every step, ``0.5 ** (1 / half_life)``."""
        return float(0.5 ** (1.0 / self.half_life))

    def __call__(self, step: int) -> float:
        """Return ``0.5 ** (1 / half_life)`` (see :meth:`DecaySchedule.__call__`)."""
        _check_step(step)
        return self.decay

    def interval_decay(self, first_step: int, last_step: int) -> float:
        """Return ``0.5 ** (n / half_life)`` for the ``n`` steps of the interval (see the base class)."""
        first, last = _check_interval(first_step, last_step)
        return float(0.5 ** (max(0, last - first + 1) / self.half_life))


publish(ConstantDecay, HalfLifeDecay)
