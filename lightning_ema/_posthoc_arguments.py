"""The checks of :class:`~lightning_ema.PostHocEMA`'s own arguments (plain Python; the rest are ``EMACallback``'s).

Each returns the validated value or raises a ``ValueError`` that names the argument and shows the value.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

from lightning_ema._validate import check_choice, check_int
from lightning_ema.schedules import KarrasDecay

__all__ = [
    "FILE_FORMATS",
    "check_dirpath",
    "check_evaluate",
    "check_sigma_rels",
    "check_snapshot_every",
    "resolve_file_format",
]

FILE_FORMATS = ("auto", "safetensors", "torch")


def check_sigma_rels(value: Any) -> tuple[float, ...]:
    """Return the tracked widths as a tuple of floats: one float, or several distinct ones, each a valid width."""
    items = [value] if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    what = "a float or a non-empty list of distinct floats in (0, sqrt(1/12)] ~ (0, 0.2887]"
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise ValueError(f"`sigma_rels` must be {what}, got {value!r}.")
    result = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ValueError(f"`sigma_rels` must be {what}, got {value!r}.")
        KarrasDecay(sigma_rel=float(item))  # raises naming `sigma_rel` and the value
        result.append(float(item))
    if len(set(result)) != len(result):
        raise ValueError(f"`sigma_rels` must be {what}, got {value!r} (a value repeats).")
    return tuple(result)


def check_snapshot_every(value: Any, every_n_steps: int) -> int:
    """Return ``snapshot_every_n_steps``, a positive multiple of the (validated) ``every_n_steps``."""
    snapshot_every = check_int("snapshot_every_n_steps", value, 1)
    if snapshot_every % every_n_steps:
        raise ValueError(
            f"`snapshot_every_n_steps` must be a multiple of every_n_steps={every_n_steps}, got "
            f"{value!r}: a snapshot is taken right after an EMA update."
        )
    return snapshot_every


def check_dirpath(value: Any) -> str | None:
    """Return the snapshot folder as a string, or ``None`` (the Trainer's default, resolved in ``setup``)."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"`dirpath` must be None or a path, got {value!r}.")
    return None if value is None else os.fspath(value)


def resolve_file_format(value: Any) -> str:
    """Return ``"safetensors"`` or ``"torch"``: ``"auto"`` is safetensors when the package is installed."""
    choice = check_choice("file_format", value, FILE_FORMATS)
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        if choice == "safetensors":
            raise ValueError(
                "`file_format` must be 'torch' or 'auto' without the safetensors package, got 'safetensors'. "
                "pip install safetensors."
            ) from None
        return "torch"
    return "safetensors" if choice == "auto" else choice


def check_evaluate(value: Any, sigma_rels: tuple[float, ...]) -> tuple[str, float | None]:
    """Split ``evaluate`` into what ``EMACallback`` evaluates and the tracked width swapped in (``None``: none).

    ``"raw"``, ``"ema"`` and ``"both"`` are ``EMACallback``'s; one of ``sigma_rels`` is evaluated by ``PostHocEMA``
    itself, with ``EMACallback`` evaluating ``"raw"``.
    """
    if isinstance(value, str):
        return check_choice("evaluate", value, ("raw", "ema", "both")), None
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value) in sigma_rels:
        return "raw", float(value)
    raise ValueError(
        f"`evaluate` must be 'raw', 'ema', 'both' or one of sigma_rels={list(sigma_rels)!r}, got {value!r}."
    )
