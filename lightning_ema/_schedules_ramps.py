"""Schedules whose decay ramps during training and then stays: warm-ups, power, exponential and cosine ramps.

Public through :mod:`lightning_ema.schedules`.
"""

from __future__ import annotations

import math

from lightning_ema._schedule_base import (
    _MISSING,
    DecaySchedule,
    _check_closed_unit_interval,
    _check_positive,
    _check_step,
    _check_unit_interval,
    _error,
    _is_integer,
    _is_real,
    publish,
)


class WarmupDecay(DecaySchedule):
    """A decay that ramps up as ``(1 + t) / (warmup + t)`` until it reaches ``decay``.

    ``decay_t = min(decay, (1 + t) / (warmup + t))``. Early averages thus forget the random
    initialization quickly.

    How it relates to the systems that use this ramp (each identity is tested against a plain
    re-implementation of the other library's rule):

    - torch-ema's ``ExponentialMovingAverage(decay, use_num_updates=True)``, updated after every optimizer
      step, is ``EMACallback(WarmupDecay(decay, warmup=10))``: its ``num_updates`` is ``t``.
    - diffusers' ``EMAModel(decay, use_ema_warmup=False, update_after_step=u, min_decay=0)`` copies the weights
      up to ``optimization_step == u + 1`` and then applies ``(1 + s) / (10 + s)`` with ``s = t - u - 1``:
      ``EMACallback(WarmupDecay(decay, 10), start_step=u + 1, count_from_start=True)``.
    - mmcv's ``EMAHook(warm_up=...)`` is *not* this schedule: it caps the momentum ``1 - decay`` by the ramp,
      so its decay falls during warm-up; see :class:`MomentumWarmupDecay`.

    Args:
        decay: the largest decay, in ``[0, 1)``.
        warmup: the warmup constant, a finite number ``>= 1`` (``warmup=1`` gives a constant decay). The
            decay reaches ``decay`` at ``t = (decay * warmup - 1) / (1 - decay)``.

    >>> schedule = WarmupDecay(decay=0.999, warmup=10)
    >>> [round(schedule(t), 4) for t in (1, 10, 100, 10_000)]
    [0.1818, 0.55, 0.9182, 0.999]
    >>> schedule == WarmupDecay(0.999, 10.0), schedule
    (True, WarmupDecay(decay=0.999, warmup=10.0))
    """

    def __init__(self, decay: float, warmup: float = 10) -> None:
        self.decay = decay
        self.warmup = warmup
        self.validate()

    def validate(self) -> None:
        """Check ``decay`` in ``[0, 1)`` and ``warmup >= 1`` (see :meth:`DecaySchedule.validate`)."""
        self.decay = _check_unit_interval("decay", getattr(self, "decay", _MISSING))
        warmup = getattr(self, "warmup", _MISSING)
        if not _is_real(warmup) or not float(warmup) >= 1.0:
            raise _error("warmup", "a finite number >= 1", warmup, "warmup=1 gives a constant decay.")
        self.warmup = float(warmup)

    def __call__(self, step: int) -> float:
        """Return ``min(decay, (1 + step) / (warmup + step))`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        return min(self.decay, (1.0 + t) / (self.warmup + t))

    def _constant_from(self) -> int | None:
        # (1 + t) / (warmup + t) >= decay  <=>  t >= (decay * warmup - 1) / (1 - decay); one step of margin.
        threshold = (self.decay * self.warmup - 1.0) / (1.0 - self.decay)
        return max(1, math.ceil(threshold) + 1) if threshold < 2.0**62 else None


class MomentumWarmupDecay(DecaySchedule):
    """A momentum (``1 - decay``) capped by a warm-up ramp: ``1 - min(momentum, t / (warmup - 1 + t))``.

    mmcv's ``EMAHook`` warm-up: its momentum at iteration ``i = t - 1`` (mmcv counts iterations from 0) is
    ``min(momentum, (1 + i) / (warmup + i))``, which this schedule evaluates at optimizer step ``t``. The ramp
    starts at ``1 / warmup`` and rises to 1, so it only matters while it is below ``momentum``: early updates
    move the EMA *less*, the decay falls from ``1 - 1 / warmup`` to ``1 - momentum`` (the opposite of
    :class:`WarmupDecay`, whose decay rises). With mmcv's defaults (``momentum=0.0002``, ``warmup=100``) the cap
    never binds. mmcv applies ``momentum ** interval`` once per update with ``interval > 1``;
    :class:`~lightning_ema.compat.MMCVEMAHook` sets that up.

    Args:
        momentum: the largest momentum, in ``(0, 1)``; the decay never falls below ``1 - momentum``.
        warmup: the warm-up constant, a finite number ``> 0``.

    >>> schedule = MomentumWarmupDecay(momentum=0.5, warmup=10)
    >>> [round(schedule(t), 4) for t in (1, 2, 9, 100)]
    [0.9, 0.8182, 0.5, 0.5]
    """

    def __init__(self, momentum: float = 0.0002, warmup: float = 100) -> None:
        self.momentum = momentum
        self.warmup = warmup
        self.validate()

    def validate(self) -> None:
        """Check ``momentum`` in ``(0, 1)`` and ``warmup > 0`` (see :meth:`DecaySchedule.validate`)."""
        momentum = getattr(self, "momentum", _MISSING)
        if not _is_real(momentum) or not 0.0 < float(momentum) < 1.0:
            raise _error("momentum", "a float in (0, 1)", momentum, "The momentum is 1 - decay.")
        self.momentum = float(momentum)
        self.warmup = _check_positive("warmup", getattr(self, "warmup", _MISSING))

    def __call__(self, step: int) -> float:
        """Return ``1 - min(momentum, step / (warmup - 1 + step))`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        return 1.0 - min(self.momentum, t / (self.warmup - 1.0 + t))

    def _constant_from(self) -> int | None:
        # t / (warmup - 1 + t) >= momentum  <=>  t >= momentum * (warmup - 1) / (1 - momentum); one step of margin.
        threshold = self.momentum * (self.warmup - 1.0) / (1.0 - self.momentum)
        return max(1, math.ceil(threshold) + 1) if threshold < 2.0**62 else None


class PowerDecay(DecaySchedule):
    """A decay that grows as a power of the step: ``1 - (1 + t / inv_gamma) ** -power``, clipped.

    ``decay_t = clip(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)``: the power warm-up of Katherine
    Crowson's, used by timm's ``ModelEmaV3``, diffusers' ``EMAModel`` and ema-pytorch. ``power=2/3`` suits runs of
    up to about a million steps, ``power=3/4`` shorter ones; with ``power=2/3`` the decay is 0.999 at 31.6K
    steps and 0.9999 at 1M steps.

    Those libraries copy the weights at their first update and then evaluate the formula at ``t - 1`` (one
    step behind this schedule), so on its own this schedule runs one step ahead of them. The same numbers,
    tested against plain re-implementations of their rules, come from:

    - timm ``ModelEmaV3(decay, min_decay, update_after_step=u, use_warmup=True, warmup_gamma=g,
      warmup_power=p)`` updated with ``step=t``, and diffusers ``EMAModel(decay, min_decay,
      update_after_step=u, use_ema_warmup=True, inv_gamma=g, power=p)``:
      ``EMACallback(PowerDecay(decay, g, p, min_decay), start_step=u + 1, count_from_start=True)``;
    - ema-pytorch ``EMA(beta, update_after_step=u, update_every=1, inv_gamma=g, power=p, min_value=m)``
      updated after every step: ``EMACallback(PowerDecay(beta, g, p, m), start_step=u + 1,
      count_from_start=True)`` (with ``update_every=n > 1`` it copies at the due steps only before ``u + 1``).

    The schedule itself is unchanged (existing configurations keep their numbers); only this description of
    its relation to the other libraries was corrected.

    Args:
        decay: the largest decay, in ``[0, 1)``.
        inv_gamma: the step scale of the ramp, a finite number ``> 0``.
        power: the exponent of the ramp, a finite number ``> 0``.
        min_decay: the smallest decay, in ``[0, decay]``.

    >>> schedule = PowerDecay(decay=0.9999, inv_gamma=1.0, power=2 / 3)
    >>> [round(schedule(t), 4) for t in (1, 100, 10_000, 10_000_000)]
    [0.37, 0.9539, 0.9978, 0.9999]
    >>> PowerDecay(decay=0.9999, min_decay=0.5)(1)
    0.5
    """

    def __init__(
        self,
        decay: float = 0.9999,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
    ) -> None:
        self.decay = decay
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_decay = min_decay
        self.validate()

    def validate(self) -> None:
        """Check every argument's range (see :meth:`DecaySchedule.validate`)."""
        self.decay = _check_unit_interval("decay", getattr(self, "decay", _MISSING))
        self.inv_gamma = _check_positive("inv_gamma", getattr(self, "inv_gamma", _MISSING))
        self.power = _check_positive("power", getattr(self, "power", _MISSING))
        min_decay = getattr(self, "min_decay", _MISSING)
        if not _is_real(min_decay) or not 0.0 <= float(min_decay) <= self.decay:
            raise _error("min_decay", f"a float in [0, decay] = [0, {self.decay!r}]", min_decay)
        self.min_decay = float(min_decay)

    def __call__(self, step: int) -> float:
        """Return the clipped power ramp at ``step`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        value = 1.0 - float((1.0 + t / self.inv_gamma) ** -self.power)
        return max(self.min_decay, min(self.decay, value))

    def _constant_from(self) -> int | None:
        # 1 - (1 + t / inv_gamma) ** -power >= decay  <=>  t >= inv_gamma * ((1 - decay) ** (-1 / power) - 1).
        log_base = -math.log1p(-self.decay) / self.power
        if log_base > 40.0:  # beyond ~2e17 steps, i.e. never in practice
            return None
        threshold = self.inv_gamma * math.expm1(log_base)
        return max(1, math.ceil(threshold) + 1) if threshold < 2.0**62 else None


class ExponentialRampDecay(DecaySchedule):
    """A decay that approaches ``decay`` exponentially: ``decay * (1 - exp(-(1 + t) / gamma))``.

    Written as a momentum ``m_t = (1 - m) * exp(-(1 + t) / gamma) + m`` with ``m = 1 - decay``, this is the ramp
    of mmyolo's and mmdet's ``ExpMomentumEMA``; here ``decay_t = 1 - m_t``. The gap to ``decay`` shrinks by a
    factor ``e`` every ``gamma`` steps.

    ``ExpMomentumEMA`` copies the weights at its first call and then evaluates the ramp at its call count
    ``t - 1``, with one momentum per update whatever its ``interval``; on its own this schedule therefore runs
    one step ahead of it. The same numbers (tested against a plain re-implementation) come from
    ``EMACallback(ExponentialRampDecay(1 - momentum, gamma), start_step=1, count_from_start=True,
    every_n_steps=interval, decay_per="update")``, which is what
    :class:`~lightning_ema.compat.MMYOLOExpMomentumEMA` sets up. YOLOX's and YOLOv5's ``ModelEMA`` use
    ``decay * (1 - exp(-n / 2000))`` after their ``n``-th update, i.e. this schedule at ``n - 1``, without a copy
    at the first update: close to, but not exactly, any lightning-ema configuration.

    Args:
        decay: the decay approached for large ``t``, in ``[0, 1)``.
        gamma: the step scale of the ramp, a finite number ``> 0``.

    >>> schedule = ExponentialRampDecay(decay=0.9998, gamma=2000)
    >>> [round(schedule(t), 4) for t in (1, 100, 2000, 20_000)]
    [0.001, 0.0492, 0.6322, 0.9998]
    """

    def __init__(self, decay: float = 0.9998, gamma: float = 2000) -> None:
        self.decay = decay
        self.gamma = gamma
        self.validate()

    def validate(self) -> None:
        """Check ``decay`` in ``[0, 1)`` and ``gamma > 0`` (see :meth:`DecaySchedule.validate`)."""
        self.decay = _check_unit_interval("decay", getattr(self, "decay", _MISSING))
        self.gamma = _check_positive("gamma", getattr(self, "gamma", _MISSING))

    def __call__(self, step: int) -> float:
        """Return ``decay * (1 - exp(-(1 + step) / gamma))`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        # 1 - m_t, written with expm1 so as to stay accurate where the decay is small.
        return self.decay * -math.expm1(-(1.0 + t) / self.gamma)


class CosineDecay(DecaySchedule):
    """A decay that moves from ``start`` to ``end`` along a half cosine over ``total_steps`` steps.

    ``decay_t = end - (end - start) * (cos(pi * min(t, total_steps) / total_steps) + 1) / 2``: ``start``
    at ``t = 0``, ``end`` from ``t = total_steps`` on. This is the momentum-teacher schedule of BYOL
    (Grill et al., 2020) and DINO (Caron et al., 2021), which go from 0.996 to exactly 1 over the whole run:
    with ``end=1`` the average stops moving from ``t = total_steps`` on (updates leave it bit for bit as it is).

    Args:
        start: the decay at ``t = 0``, in ``[0, 1]``.
        end: the decay from ``t = total_steps`` on, in ``[0, 1]``; may be below ``start``. ``start`` and ``end``
            cannot both be 1: that constant decay would never move the average.
        total_steps: the length of the ramp in optimizer steps, an integer ``>= 1``.

    >>> schedule = CosineDecay(start=0.996, end=0.9999, total_steps=1000)
    >>> [round(schedule(t), 6) for t in (1, 500, 1000, 5000)]
    [0.996, 0.99795, 0.9999, 0.9999]
    >>> CosineDecay(start=0.996, end=1.0, total_steps=1000)(1000)
    1.0
    """

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start = start
        self.end = end
        self.total_steps = total_steps
        self.validate()

    def validate(self) -> None:
        """Check ``start`` and ``end`` in ``[0, 1]``, not both 1, and ``total_steps >= 1``."""
        self.start = _check_closed_unit_interval("start", getattr(self, "start", _MISSING))
        self.end = _check_closed_unit_interval("end", getattr(self, "end", _MISSING))
        if self.start == self.end == 1.0:
            raise _error(
                "end",
                "below 1 when `start` is 1",
                self.end,
                "A decay of 1 at every step would freeze the average at its initial value.",
            )
        total_steps = getattr(self, "total_steps", _MISSING)
        if not _is_integer(total_steps) or int(total_steps) < 1:
            raise _error("total_steps", "an integer >= 1", total_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step: int) -> float:
        """Return the cosine ramp at ``step`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        progress = min(t, self.total_steps) / self.total_steps
        return self.end - (self.end - self.start) * (math.cos(math.pi * progress) + 1.0) / 2.0

    def _constant_from(self) -> int | None:
        return self.total_steps


publish(CosineDecay, ExponentialRampDecay, MomentumWarmupDecay, PowerDecay, WarmupDecay)
