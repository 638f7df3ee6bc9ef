"""Finding an EMA state in a checkpoint by its key, and comparing saved settings with the current ones (pure).

Schedule descriptions (``repr``) are compared in their normalised form
(:func:`~lightning_ema.schedules.normalize_repr`), so a checkpoint written by an older version, whose keys and
configuration hold ``warmup=10`` where today's hold ``warmup=10.0``, is still found and still matches.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from lightning_ema.schedules import normalize_repr

__all__ = ["config_changes", "find_state_key", "normalize_state_key"]


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Describe the settings that differ between a saved configuration and the current one (``None``: same).

    Schedule descriptions are compared in their normalised form (:func:`~lightning_ema.schedules.normalize_repr`),
    so a schedule saved by an older version as ``warmup=10`` is the same as today's ``warmup=10.0``.
    """
    changed = [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in current.items()
        if _normalized(saved.get(key)) != _normalized(value)
    ]
    return ", ".join(changed) or None


def _normalized(value: Any) -> Any:
    if isinstance(value, str):
        return normalize_repr(value)
    if isinstance(value, (list, tuple)):
        return [_normalized(item) for item in value]
    return value


def normalize_state_key(key: str) -> str:
    """Return ``key`` with the schedule descriptions in it normalised (see :func:`config_changes`).

    A state key is the callback's class name followed by the ``repr`` of a dict of plain values
    (``EMACallback{'decay': 'WarmupDecay(decay=0.99, warmup=10)', ...}``); the dict is parsed, not evaluated. A key
    that is not of that form comes back unchanged.
    """
    start = key.find("{")
    if start <= 0:
        return key
    try:
        fields = ast.literal_eval(key[start:])
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return key
    if not isinstance(fields, dict):
        return key
    if isinstance(fields.get("decay"), str):
        fields["decay"] = normalize_repr(fields["decay"])
    elif isinstance(fields.get("decay"), list):
        fields["decay"] = [normalize_repr(item) if isinstance(item, str) else item for item in fields["decay"]]
    return f"{key[:start]}{fields!r}"


def find_state_key(states: Mapping[str, Any], state_key: str) -> str | None:
    """Return the key under which ``states`` holds the state of ``state_key``, or ``None``.

    An exact match first; otherwise the one key that is equal once schedule descriptions are normalised (a
    checkpoint written before ``WarmupDecay(0.99, 10)`` and ``WarmupDecay(0.99, 10.0)`` had one key).
    """
    if state_key in states:
        return state_key
    wanted = normalize_state_key(state_key)
    matches = [key for key in states if normalize_state_key(key) == wanted]
    return matches[0] if len(matches) == 1 else None
