"""Argument checks shared by the public constructors; every message names the argument and the value."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

_FLOAT_DTYPES = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
}


def as_int(value: Any) -> int | None:
    """Return ``value`` as a plain ``int`` if it is an integer (``int``, ``numpy.int64``, ...) but not a ``bool``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:  # not an integer (a float, a string, a tensor with more than one element)
        return None


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a ``bool``) of at least ``minimum``."""
    number = as_int(value)
    if number is None or number < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings in ``choices``."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def parse_dtype(name: str, value: Any) -> torch.dtype | None:
    """Return the floating-point ``torch.dtype`` that ``value`` names (``None`` passes through).

    Strings such as ``"float32"`` or ``"torch.bfloat16"`` are accepted so that YAML can set a dtype.
    """
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = _FLOAT_DTYPES.get(value.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"`{name}` must be None or a floating-point dtype such as torch.float32 or 'float32', got {value!r}."
        )
    return dtype


def parse_device(name: str, value: Any) -> torch.device | None:
    """Return the ``torch.device`` that ``value`` names (``None`` passes through)."""
    if value is None:
        return None
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(f"`{name}` must be None, a torch.device or a device string such as 'cpu', got {value!r}.")


def parse_patterns(name: str, value: Any) -> tuple[str, ...] | None:
    """Return glob patterns as a tuple; a single string is one pattern, ``None`` means no filter."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(pattern, str) and pattern for pattern in value)
    ):
        raise ValueError(
            f"`{name}` must be None or a non-empty list of glob patterns such as ['generator.*'], got {value!r}."
        )
    return tuple(value)
