"""Decay schedules for exponential moving averages of model weights.

An exponential moving average (EMA) of the weights ``w_t`` is updated as::

    ema_t = decay_t * ema_{t-1} + (1 - decay_t) * w_t

where ``ema_0`` is a copy of the initial weights. A *schedule* maps ``step``, the number of optimizer
steps done so far (``t = 1, 2, ...``), to ``decay_t`` in ``[0, 1]``: the update made right after the
``t``-th optimizer step uses ``schedule(t)``. A decay of ``0`` copies the weights into the average; a
decay close to ``1`` averages over roughly ``1 / (1 - decay)`` steps, and a decay of ``1`` leaves the average
as it is. A schedule may reach ``1`` (BYOL's and DINO's teachers end there); a constant decay may not, since it
would never move the average.

When the average is updated only every few optimizer steps, the update that covers steps ``a..b``
uses :meth:`DecaySchedule.interval_decay`, the product ``schedule(a) * ... * schedule(b)``, so that
the average keeps the same time constant (measured in optimizer steps) whatever the update interval.

Schedules are small, picklable objects with plain attributes. :meth:`DecaySchedule.validate` checks and
normalises them (each real-valued argument is stored as a ``float``, so ``WarmupDecay(0.99, 10)`` and
``WarmupDecay(0.99, 10.0)`` are one configuration); constructors, :func:`as_schedule` and unpickling all call it,
so a schedule read from a checkpoint is checked like one built in code. :meth:`DecaySchedule.config` describes
one with plain values, which is what checkpoints store to tell whether the schedule changed between a
run and its resumption, and what ``__eq__``, ``__hash__`` and ``__repr__`` are built on.

The schedules are defined in private modules (``_schedule_base``, ``_schedules_constant``,
``_schedules_ramps``, ``_schedules_karras``) and are public here only: their ``__module__`` is this module, so
pickles, reprs and YAML ``class_path`` entries name ``lightning_ema.schedules.<Name>``.

This module imports only the standard library.
"""

from __future__ import annotations

import ast

from lightning_ema._schedule_base import ConfigValue, DecaySchedule, _error, _freeze_hint, _is_real
from lightning_ema._schedules_constant import ConstantDecay, HalfLifeDecay
from lightning_ema._schedules_karras import KarrasDecay
from lightning_ema._schedules_ramps import (
    CosineDecay,
    ExponentialRampDecay,
    MomentumWarmupDecay,
    PowerDecay,
    WarmupDecay,
)

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
    "normalize_repr",
]


def as_schedule(decay: float | DecaySchedule, name: str = "decay") -> DecaySchedule:
    """Return ``decay`` as a schedule: a float becomes a :class:`ConstantDecay`.

    A schedule object is checked with :meth:`DecaySchedule.validate` and returned as is, so that one whose
    attributes were set behind its constructor's back (edited, or unpickled from a crafted file) is refused here
    too.

    Args:
        decay: a float in ``[0, 1)`` or a :class:`DecaySchedule` (returned as is).
        name: the argument name used in the error message, e.g. ``"teacher_decay"``.

    Returns:
        The schedule.

    Raises:
        ValueError: if ``decay`` is neither a float in ``[0, 1)`` nor a valid :class:`DecaySchedule`.

    >>> as_schedule(0.999)
    ConstantDecay(decay=0.999)
    >>> as_schedule(WarmupDecay(decay=0.999))
    WarmupDecay(decay=0.999, warmup=10.0)
    """
    if isinstance(decay, DecaySchedule):
        try:
            decay.validate()
        except ValueError as error:
            raise ValueError(f"`{name}` must be a valid schedule, got a {type(decay).__name__} with {error}") from error
        return decay
    if _is_real(decay) and 0.0 <= float(decay) < 1.0:
        return ConstantDecay(float(decay))
    what = "a float in [0, 1) or a DecaySchedule from lightning_ema.schedules"
    raise _error(name, what, decay, _freeze_hint(decay))


_BUILT_IN: dict[str, type[DecaySchedule]] = {
    cls.__name__: cls
    for cls in (
        ConstantDecay,
        CosineDecay,
        ExponentialRampDecay,
        HalfLifeDecay,
        KarrasDecay,
        MomentumWarmupDecay,
        PowerDecay,
        WarmupDecay,
    )
}


def normalize_repr(text: str) -> str:
    """Return the ``repr`` that today's code gives the built-in schedule described by ``text``.

    Checkpoints store schedules by ``repr``, and older versions wrote the arguments as given
    (``WarmupDecay(decay=0.99, warmup=10)``) where today's normalised form is ``warmup=10.0``. The text is parsed,
    never evaluated: only a call of a built-in schedule with literal keyword arguments is rebuilt. Anything else
    (a schedule of your own, a value that is not a schedule) comes back unchanged.

    >>> normalize_repr("WarmupDecay(decay=0.99, warmup=10)")
    'WarmupDecay(decay=0.99, warmup=10.0)'
    >>> normalize_repr("MySchedule(scale=2)")
    'MySchedule(scale=2)'
    """
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            return text
        cls = _BUILT_IN.get(call.func.id)
        if cls is None or any(keyword.arg is None for keyword in call.keywords):
            return text
        arguments = {str(keyword.arg): ast.literal_eval(keyword.value) for keyword in call.keywords}
        return repr(cls(**arguments))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return text
