"""Decay schedules for exponential moving averages of model weights.

An exponential moving average (EMA) of the weights ``w_t`` is updated as::

    ema_t = decay_t * ema_{t-1} + (1 - decay_t) * w_t

where ``ema_0`` is a copy of the initial weights. A *schedule* maps ``step``, the number of optimizer
steps done so far (``t = 1, 2, ...``), to ``decay_t`` in ``[0, 1)``: the update made right after the
``t``-th optimizer step uses ``schedule(t)``. A decay of ``0`` copies the weights into the average; a
decay close to ``1`` averages over roughly ``1 / (1 - decay)`` steps.

When the average is updated only every few optimizer steps, the update that covers steps ``a..b``
uses :meth:`DecaySchedule.interval_decay`, the product ``schedule(a) * ... * schedule(b)``, so that
the average keeps the same time constant (measured in optimizer steps) whatever the update interval.

Schedules are small, picklable objects with plain attributes. :meth:`DecaySchedule.config` describes
one with plain values, which is what checkpoints store to tell whether the schedule changed between a
run and its resumption, and what ``__eq__``, ``__hash__`` and ``__repr__`` are built on.

This module imports only the standard library.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from typing import TypeGuard

__all__ = [
    "ConfigValue",
    "ConstantDecay",
    "CosineDecay",
    "DecaySchedule",
    "ExponentialRampDecay",
    "HalfLifeDecay",
    "KarrasDecay",
    "MomentumWarmupDecay",
    "PowerDecay",
    "WarmupDecay",
    "as_schedule",
]

ConfigValue = float | int | str | None
"""A plain value in :meth:`DecaySchedule.config`."""

# sigma_rel of KarrasDecay(gamma=0): the largest relative standard deviation a power-function EMA can
# have (gamma >= 0). A value a few ulps above it (e.g. ``1 / math.sqrt(12)``) is accepted as gamma = 0.
_MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
_SIGMA_REL_SLACK = 1e-15

_MISSING = object()
_NAMED_PARAMETER_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


# --------------------------------------------------------------------------------------------------
# Argument checks. Every error reads "`name` must be <what>, got <value!r>." plus an optional hint.
# --------------------------------------------------------------------------------------------------


def _error(name: str, what: str, value: object, hint: str | None = None) -> ValueError:
    message = f"`{name}` must be {what}, got {value!r}."
    if hint:
        message = f"{message} {hint}"
    return ValueError(message)


def _is_integer(value: object) -> TypeGuard[numbers.Integral]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    """Whether ``value`` is a finite real number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value))


def _plain_number(value: numbers.Real) -> float:
    """Convert a checked real number to a plain Python ``int`` (integers) or ``float`` (the rest)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


def _freeze_hint(value: object) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1:
        return "A decay of 1 would freeze the average at its initial value."
    return None


def _check_unit_interval(name: str, value: object) -> float:
    """Check a decay-like value in ``[0, 1)`` and return it as a ``float``."""
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise _error(name, "a float in [0, 1)", value, _freeze_hint(value))
    return float(value)


def _check_positive(name: str, value: object) -> float:
    """Check a finite number ``> 0`` and return it as a plain ``int`` or ``float``."""
    if not _is_real(value) or not float(value) > 0.0:
        raise _error(name, "a finite number > 0", value)
    return _plain_number(value)


def _check_step(step: object, name: str = "step") -> int:
    """Check an optimizer step count ``>= 1`` and return it as a plain ``int``."""
    if not _is_integer(step) or int(step) < 1:
        raise _error(name, "an integer >= 1", step, "Steps count optimizer steps done, starting at 1.")
    return int(step)


def _check_interval(first_step: object, last_step: object) -> tuple[int, int]:
    first = _check_step(first_step, "first_step")
    if not _is_integer(last_step) or int(last_step) < 0:
        raise _error("last_step", "an integer >= 0", last_step)
    return first, int(last_step)


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


class DecaySchedule(abc.ABC):
    """Base class of the decay schedules: maps optimizer step ``t >= 1`` to a decay in ``[0, 1)``.

    Subclasses implement :meth:`__call__` and store each constructor argument in an attribute of the
    same name (so that the default :meth:`config` can describe them); they may override
    :meth:`interval_decay` with a closed form.
    """

    @abc.abstractmethod
    def __call__(self, step: int) -> float:
        """Return the decay of the EMA update made after optimizer step ``step``.

        Args:
            step: number of optimizer steps done, an integer ``>= 1``.

        Returns:
            The decay, in ``[0, 1)``.

        Raises:
            ValueError: if ``step`` is not an integer ``>= 1``.
        """

    def interval_decay(self, first_step: int, last_step: int) -> float:
        """Return the product of ``self(s)`` for ``s`` in ``first_step..last_step`` (both included).

        An EMA update that covers several optimizer steps uses this product as its decay, which keeps
        the time constant of the average the same as with one update per optimizer step.

        Args:
            first_step: first optimizer step of the interval, an integer ``>= 1``.
            last_step: last optimizer step of the interval, an integer ``>= 0``. The interval is empty
                (and the product ``1.0``) when ``last_step < first_step``.

        Returns:
            The product of the decays over the interval, in ``[0, 1]``.

        Raises:
            ValueError: if ``first_step`` or ``last_step`` is not a valid step.
        """
        first, last = _check_interval(first_step, last_step)
        if last < first:
            return 1.0
        product = 1.0
        constant_from = self._constant_from()
        if constant_from is not None and last >= constant_from:
            # From step `constant_from` on the decay no longer changes: multiply that tail in one go.
            tail_start = max(first, constant_from)
            product = self(tail_start) ** (last - tail_start + 1)
            last = tail_start - 1
        for step in range(first, last + 1):
            product *= self(step)
        return product

    def _constant_from(self) -> int | None:
        """Return a step from which the decay is constant, or ``None`` (used by interval_decay)."""
        return None

    def config(self) -> dict[str, ConfigValue]:
        """Describe the schedule with plain values: its class name and constructor arguments.

        The default implementation reads, for each argument of ``__init__``, the attribute of the same
        name. Subclasses that store their arguments differently override it.

        Returns:
            A dict such as ``{"class": "WarmupDecay", "decay": 0.999, "warmup": 10}``.

        Raises:
            TypeError: if an argument is not stored as a plain attribute (override ``config``).
        """
        config: dict[str, ConfigValue] = {"class": type(self).__name__}
        parameters = list(inspect.signature(type(self).__init__).parameters.values())[1:]
        for name in (p.name for p in parameters if p.kind in _NAMED_PARAMETER_KINDS):
            value = getattr(self, name, _MISSING)
            if value is _MISSING:
                raise TypeError(
                    f"`{type(self).__name__}` must store its argument `{name}` as an attribute of the same "
                    "name to describe the schedule, got no such attribute. Store it, or override `config`."
                )
            if value is not None and not isinstance(value, (int, float, str)):
                raise TypeError(
                    f"`{type(self).__name__}.{name}` must be a plain int, float, str or None to describe "
                    f"the schedule, got {value!r}. Store the argument `{name}` as an attribute of the same "
                    "name, or override `config`."
                )
            config[name] = value
        return config

    def __repr__(self) -> str:
        config = self.config()
        name = config.pop("class")
        arguments = ", ".join(f"{key}={value!r}" for key, value in config.items() if value is not None)
        return f"{name}({arguments})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecaySchedule):
            return NotImplemented
        return type(self) is type(other) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(self.config().items()))


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


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
        self.decay = _check_unit_interval("decay", decay)

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
    """

    def __init__(self, half_life: float) -> None:
        self.half_life = _check_positive("half_life", half_life)

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
    """

    def __init__(self, decay: float, warmup: float = 10) -> None:
        self.decay = _check_unit_interval("decay", decay)
        if not _is_real(warmup) or not float(warmup) >= 1.0:
            raise _error("warmup", "a finite number >= 1", warmup, "warmup=1 gives a constant decay.")
        self.warmup = _plain_number(warmup)

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
        if not _is_real(momentum) or not 0.0 < float(momentum) < 1.0:
            raise _error("momentum", "a float in (0, 1)", momentum, "The momentum is 1 - decay.")
        self.momentum = float(momentum)
        self.warmup = _check_positive("warmup", warmup)

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
        self.decay = _check_unit_interval("decay", decay)
        self.inv_gamma = _check_positive("inv_gamma", inv_gamma)
        self.power = _check_positive("power", power)
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
        self.decay = _check_unit_interval("decay", decay)
        self.gamma = _check_positive("gamma", gamma)

    def __call__(self, step: int) -> float:
        """Return ``decay * (1 - exp(-(1 + step) / gamma))`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        # 1 - m_t, written with expm1 so as to stay accurate where the decay is small.
        return self.decay * -math.expm1(-(1.0 + t) / self.gamma)


class CosineDecay(DecaySchedule):
    """A decay that moves from ``start`` to ``end`` along a half cosine over ``total_steps`` steps.

    ``decay_t = end - (end - start) * (cos(pi * min(t, total_steps) / total_steps) + 1) / 2``: ``start``
    at ``t = 0``, ``end`` from ``t = total_steps`` on. This is the momentum-teacher schedule of BYOL
    (Grill et al., 2020) and DINO (Caron et al., 2021), which go from 0.996 towards 1; here ``end`` is
    below 1 so that the teacher keeps learning.

    Args:
        start: the decay at ``t = 0``, in ``[0, 1)``.
        end: the decay from ``t = total_steps`` on, in ``[0, 1)``; may be below ``start``.
        total_steps: the length of the ramp in optimizer steps, an integer ``>= 1``.

    >>> schedule = CosineDecay(start=0.996, end=0.9999, total_steps=1000)
    >>> [round(schedule(t), 6) for t in (1, 500, 1000, 5000)]
    [0.996, 0.99795, 0.9999, 0.9999]
    """

    def __init__(self, start: float, end: float, total_steps: int) -> None:
        self.start = _check_unit_interval("start", start)
        self.end = _check_unit_interval("end", end)
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


def _sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA profile with exponent ``gamma``."""
    # sigma_rel ** 2 = (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)), written so as not to overflow.
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


def _gamma_from_sigma_rel(sigma_rel: float) -> float:
    """Invert :func:`_sigma_rel_from_gamma` on ``gamma >= 0`` for ``sigma_rel`` in ``(0, sqrt(1/12)]``.

    With ``s = sigma_rel ** -2`` this is the largest real root of
    ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0``, i.e. of ``h(gamma) = s`` with
    ``h(gamma) = (gamma + 2) ** 2 * (gamma + 3) / (gamma + 1)``, which increases on ``gamma >= 0`` from
    ``h(0) = 12``. Solved by bisection down to adjacent floats.
    """
    square = sigma_rel * sigma_rel
    inverse_square = 1.0 / square if square > 0.0 else math.inf
    if not math.isfinite(inverse_square):
        return math.inf
    if inverse_square <= 12.0:
        return 0.0

    def excess(gamma: float) -> float:
        # Grouped so as not to overflow for any finite inverse_square.
        return (gamma + 2.0) * (gamma + 2.0) * ((gamma + 3.0) / (gamma + 1.0)) - inverse_square

    # h(g) > (g + 2) ** 2 > g ** 2, so the root lies below sqrt(s).
    low, high = 0.0, math.sqrt(inverse_square)
    while True:
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            break
        if excess(middle) < 0.0:
            low = middle
        else:
            high = middle
    return low if abs(excess(low)) <= abs(excess(high)) else high


class KarrasDecay(DecaySchedule):
    """The power-function EMA of EDM2: ``decay_t = (1 - 1 / t) ** (gamma + 1)``.

    From Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, 2024).
    The average weights step ``s <= t`` in proportion to ``s ** gamma``, so its length grows with
    training: ``gamma = 0`` is the plain mean of all weights so far. ``decay_1 = 0``: the first update
    copies the weights. The paper specifies the length by ``sigma_rel``, the standard deviation of the
    weighting profile relative to the training length, related to ``gamma`` by
    ``sigma_rel ** 2 = (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))``; ``sigma_rel = 0.10`` is
    ``gamma ~ 6.94`` and ``sigma_rel = 0.05`` is ``gamma ~ 16.97``.

    Args:
        gamma: the exponent of the profile, a finite number ``>= 0``. Give either ``gamma`` or
            ``sigma_rel``.
        sigma_rel: the relative standard deviation of the profile, in ``(0, sqrt(1/12)] ~ (0, 0.2887]``
            (``sqrt(1/12)`` is ``gamma = 0``).

    Both ``gamma`` and ``sigma_rel`` are available as attributes whichever one was given.

    >>> schedule = KarrasDecay(sigma_rel=0.10)
    >>> round(schedule.gamma, 2)
    6.94
    >>> [round(schedule(t), 4) for t in (1, 2, 100, 10_000)]
    [0.0, 0.0041, 0.9233, 0.9992]
    >>> round(KarrasDecay(gamma=16.97).sigma_rel, 4)
    0.05
    """

    def __init__(self, gamma: float | None = None, sigma_rel: float | None = None) -> None:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError(
                f"Exactly one of `gamma` and `sigma_rel` must be given, got gamma={gamma!r}, sigma_rel={sigma_rel!r}."
            )
        self._gamma_argument: float | None = None
        self._sigma_rel_argument: float | None = None
        if gamma is not None:
            if not _is_real(gamma) or not float(gamma) >= 0.0:
                raise _error("gamma", "a finite number >= 0", gamma)
            self._gamma_argument = _plain_number(gamma)
            self.gamma: float = float(gamma)
            self.sigma_rel: float = _sigma_rel_from_gamma(self.gamma)
        else:
            limit = _MAX_SIGMA_REL * (1.0 + _SIGMA_REL_SLACK)
            if not _is_real(sigma_rel) or not 0.0 < float(sigma_rel) <= limit:
                raise _error(
                    "sigma_rel",
                    "a float in (0, sqrt(1/12)] ~ (0, 0.2887]",
                    sigma_rel,
                    "sqrt(1/12) corresponds to gamma=0; smaller values give longer averages.",
                )
            self.gamma = _gamma_from_sigma_rel(float(sigma_rel))
            if not math.isfinite(self.gamma):
                raise _error(
                    "sigma_rel",
                    "a float in (0, sqrt(1/12)] ~ (0, 0.2887]",
                    sigma_rel,
                    "It is too small: the matching gamma is not a finite float.",
                )
            self._sigma_rel_argument = float(sigma_rel)
            self.sigma_rel = float(sigma_rel)

    def __call__(self, step: int) -> float:
        """Return ``(1 - 1 / step) ** (gamma + 1)`` (see :meth:`DecaySchedule.__call__`)."""
        t = _check_step(step)
        return float((1.0 - 1.0 / t) ** (self.gamma + 1.0))

    def interval_decay(self, first_step: int, last_step: int) -> float:
        """Return ``((first_step - 1) / last_step) ** (gamma + 1)``, the telescoping product."""
        first, last = _check_interval(first_step, last_step)
        if last < first:
            return 1.0
        return float(((first - 1.0) / last) ** (self.gamma + 1.0))

    def config(self) -> dict[str, ConfigValue]:
        """Describe the schedule by the argument it was given (see :meth:`DecaySchedule.config`).

        Returns:
            ``{"class": "KarrasDecay", "gamma": ..., "sigma_rel": None}`` or
            ``{"class": "KarrasDecay", "gamma": None, "sigma_rel": ...}``.
        """
        return {
            "class": type(self).__name__,
            "gamma": self._gamma_argument,
            "sigma_rel": self._sigma_rel_argument,
        }


def as_schedule(decay: float | DecaySchedule, name: str = "decay") -> DecaySchedule:
    """Return ``decay`` as a schedule: a float becomes a :class:`ConstantDecay`.

    Args:
        decay: a float in ``[0, 1)`` or a :class:`DecaySchedule` (returned as is).
        name: the argument name used in the error message, e.g. ``"teacher_decay"``.

    Returns:
        The schedule.

    Raises:
        ValueError: if ``decay`` is neither a float in ``[0, 1)`` nor a :class:`DecaySchedule`.

    >>> as_schedule(0.999)
    ConstantDecay(decay=0.999)
    >>> as_schedule(WarmupDecay(decay=0.999))
    WarmupDecay(decay=0.999, warmup=10)
    """
    if isinstance(decay, DecaySchedule):
        return decay
    if _is_real(decay) and 0.0 <= float(decay) < 1.0:
        return ConstantDecay(float(decay))
    what = "a float in [0, 1) or a DecaySchedule from lightning_ema.schedules"
    raise _error(name, what, decay, _freeze_hint(decay))
