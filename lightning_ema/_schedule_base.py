"""The base class of the decay schedules and the checks of their arguments.

Everything here is public through :mod:`lightning_ema.schedules`, whose docstring describes schedules;
this module imports only the standard library.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from typing import Any, TypeGuard

ConfigValue = float | int | str | None
"""A plain value in :meth:`DecaySchedule.config`."""

#: The module the schedules are public in (their ``__module__``), see :func:`publish`.
PUBLIC_MODULE = "lightning_ema.schedules"


class _Missing:
    """Stands for a field that a schedule object lacks (one unpickled from a crafted file, for instance)."""

    def __repr__(self) -> str:
        return "nothing (the attribute is missing)"


_MISSING: Any = _Missing()
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
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def _freeze_hint(value: object) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1:
        return "A decay of 1 would freeze the average at its initial value."
    return None


def _check_unit_interval(name: str, value: object) -> float:
    """Check a decay-like value in ``[0, 1)`` and return it as a ``float``."""
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise _error(name, "a float in [0, 1)", value, _freeze_hint(value))
    return float(value)


def _check_closed_unit_interval(name: str, value: object) -> float:
    """Check a decay that a schedule may reach, in ``[0, 1]``, and return it as a ``float``."""
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise _error(name, "a float in [0, 1]", value)
    return float(value)


def _check_positive(name: str, value: object) -> float:
    """Check a finite number ``> 0`` and return it as a ``float``."""
    if not _is_real(value) or not float(value) > 0.0:
        raise _error(name, "a finite number > 0", value)
    return float(value)


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
    """Base class of the decay schedules: maps optimizer step ``t >= 1`` to a decay in ``[0, 1]``.

    Subclasses implement :meth:`__call__` and store each constructor argument in an attribute of the
    same name (so that the default :meth:`config` can describe them); they may override
    :meth:`interval_decay` with a closed form, and :meth:`validate` to check their attributes.
    """

    def validate(self) -> None:  # noqa: B027 - a hook with a default, not an abstract method
        """Check the schedule's attributes and normalise them in place; raise ``ValueError`` if one is invalid.

        The built-in schedules' constructors store their arguments and call it; :func:`as_schedule` calls it for
        a schedule object it is given, and unpickling calls it (``torch.load`` of a checkpoint whose
        hyper-parameters hold a schedule), so that no path delivers a schedule its constructor would refuse. The
        base class checks nothing: override it in a schedule of your own.

        Raises:
            ValueError: if an attribute is invalid; the message names it and its value.
        """

    def __setstate__(self, state: object) -> None:
        """Restore a pickled schedule and :meth:`validate` it, as the constructor would."""
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise ValueError(f"A pickled {type(self).__name__} must hold a dict of attributes, got {state!r}.")
        self.__dict__.update(state)
        try:
            self.validate()
        except ValueError as error:
            raise ValueError(f"A saved {type(self).__name__} is invalid: {error}") from error

    @abc.abstractmethod
    def __call__(self, step: int) -> float:
        """Return the decay of the EMA update made after optimizer step ``step``.

        Args:
            step: number of optimizer steps done, an integer ``>= 1``.

        Returns:
            The decay, in ``[0, 1]``.

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


def publish(*classes: type) -> None:
    """Name ``lightning_ema.schedules`` as the module of ``classes``, the path they are imported and pickled by.

    The schedules are defined in private modules and re-exported by :mod:`lightning_ema.schedules`; pickles
    (checkpoints, hyper-parameters, ``torch.serialization.add_safe_globals`` allowlists), reprs and YAML
    ``class_path`` entries all refer to that public path, so it is the one ``__module__`` must give.
    """
    for cls in classes:
        cls.__module__ = PUBLIC_MODULE


publish(DecaySchedule)
