"""``KarrasDecay``, the power-function EMA of EDM2, and the conversions between ``gamma`` and ``sigma_rel``.

Public through :mod:`lightning_ema.schedules`.
"""

from __future__ import annotations

import math

from lightning_ema._schedule_base import (
    _MISSING,
    ConfigValue,
    DecaySchedule,
    _check_interval,
    _check_step,
    _error,
    _is_real,
    publish,
)

# sigma_rel of KarrasDecay(gamma=0): the largest relative standard deviation a power-function EMA can
# have (gamma >= 0). A value a few ulps above it (e.g. ``1 / math.sqrt(12)``) is accepted as gamma = 0.
_MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
_SIGMA_REL_SLACK = 1e-15


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
        self._gamma_argument = gamma
        self._sigma_rel_argument = sigma_rel
        self.validate()

    def validate(self) -> None:
        """Check that exactly one valid argument was given, and derive the other (see the base class)."""
        gamma = getattr(self, "_gamma_argument", _MISSING)
        sigma_rel = getattr(self, "_sigma_rel_argument", _MISSING)
        if (gamma is None) == (sigma_rel is None) or _MISSING in (gamma, sigma_rel):
            raise ValueError(
                f"Exactly one of `gamma` and `sigma_rel` must be given, got gamma={gamma!r}, sigma_rel={sigma_rel!r}."
            )
        if gamma is not None:
            if not _is_real(gamma) or not float(gamma) >= 0.0:
                raise _error("gamma", "a finite number >= 0", gamma)
            self._gamma_argument = float(gamma)
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


publish(KarrasDecay)
