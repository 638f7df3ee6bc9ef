"""Pure tensor kernels of the EMA: names, selection, update, copy and exchange.

Nothing here knows about Lightning or keeps state; every function works on lists of tensors that the
caller groups by (device, dtype), so that each call is one multi-tensor (``torch._foreach_*``) kernel.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "WRAPPER_PREFIXES",
    "canonical_name",
    "copy_",
    "ema_dtype_for",
    "exchange_",
    "is_selected",
    "lerp_",
    "nonfinite_mask",
    "squared_distance",
    "squared_norm",
]

_HALF = (torch.float16, torch.bfloat16)

#: Path components that wrappers insert into ``state_dict`` names (DDP, ``torch.compile``, Fabric).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "_forward_module.")


def canonical_name(name: str) -> str:
    """Return a ``state_dict`` name without wrapper path components.

    ``module.`` is removed only where it leads the name (once the others are gone, so a compiled DDP model's
    ``_orig_mod.module.`` goes too) (DDP wraps the whole model, and a user may well
    name a submodule ``module``); ``_orig_mod.`` and ``_forward_module.`` are removed wherever they occur,
    since ``torch.compile`` and Fabric can wrap any submodule.

    Example:
        >>> canonical_name("module.net._orig_mod.fc.weight")
        'net.fc.weight'
        >>> canonical_name("encoder.module.weight")
        'encoder.module.weight'
        >>> canonical_name("_orig_mod.module.fc.weight")
        'fc.weight'
    """
    parts = [part for part in name.split(".") if part not in ("_orig_mod", "_forward_module")]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def is_selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Return whether the canonical ``name`` passes the ``include`` and ``exclude`` glob patterns.

    Example:
        >>> is_selected("generator.fc.weight", ["generator.*"], None)
        True
        >>> is_selected("generator.fc.weight", None, ["*.fc.*"])
        False
    """
    if include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return False
    return exclude is None or not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def ema_dtype_for(weight_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Return the dtype the EMA of a floating-point weight is kept in.

    Half-precision weights get a float32 EMA unless a dtype is requested: with a decay of 0.9999 the
    update is 1e-4 of the difference, which bfloat16's 8-bit mantissa rounds away.

    Example:
        >>> ema_dtype_for(torch.bfloat16, None)
        torch.float32
        >>> ema_dtype_for(torch.float64, None)
        torch.float64
    """
    if requested is not None:
        return requested
    if weight_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight_dtype


@torch.no_grad()
def lerp_(ema: list[Tensor], weights: list[Tensor], weight: float) -> None:
    """Move each EMA tensor towards its weight in place: ``ema += weight * (w - ema)``.

    One fused ``torch._foreach_lerp_`` when the lists share a dtype. When the EMA is kept in a wider
    dtype than the weights (float32 EMA of bfloat16 weights) ``lerp`` refuses mixed dtypes, so the update
    is written as ``ema * (1 - weight) + w * weight`` with two in-place multi-tensor kernels that promote
    the weights on the fly, allocating nothing.

    Args:
        ema: EMA tensors, all on one device.
        weights: the current weights, paired with ``ema`` by position and on the same device.
        weight: ``1 - decay``.
    """
    if not ema:
        return
    if ema[0].dtype == weights[0].dtype:
        torch._foreach_lerp_(ema, weights, weight)
    else:
        torch._foreach_mul_(ema, 1.0 - weight)
        torch._foreach_add_(ema, weights, alpha=weight)


@torch.no_grad()
def copy_(destination: list[Tensor], source: list[Tensor]) -> None:
    """Copy ``source`` into ``destination`` in place, converting device and dtype as needed."""
    if destination:
        torch._foreach_copy_(destination, source)


@torch.no_grad()
def nonfinite_mask(tensors: list[Tensor]) -> Tensor:
    """Return a boolean tensor that is ``True`` exactly for each tensor holding a NaN or an infinity.

    On CUDA one fused ``_foreach_norm(ord=inf)`` answers it (the largest absolute value is non-finite exactly
    when the tensor holds a NaN or an infinity). On CPU that kernel is several times slower than reading the
    weights once, so each tensor is screened by its sum instead: a NaN or an infinity makes the sum non-finite
    (``+inf`` and ``-inf`` together give NaN). A sum can also overflow from large finite values, so the tensors
    the screen flags, normally none, are checked exactly with ``isfinite``: no finite tensor is ever flagged.
    Empty tensors are never flagged.
    """
    if tensors[0].device.type == "cuda" and all(t.numel() for t in tensors):
        return ~torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"))))
    sums = torch.stack([t.sum(dtype=torch.float32) if t.dtype in _HALF else t.sum().float() for t in tensors])
    flagged = ~torch.isfinite(sums)
    if not bool(flagged.any()):
        return flagged
    exact = [
        bool(is_flagged) and not bool(torch.isfinite(t).all()) for t, is_flagged in zip(tensors, flagged, strict=True)
    ]
    return torch.tensor(exact, device=sums.device)


@torch.no_grad()
def squared_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Return the sum of squared entries of all ``tensors`` as a float32 0-d tensor on their device."""
    norms = torch._foreach_norm([t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors])
    return torch.stack(norms).float().square().sum()


@torch.no_grad()
def squared_distance(ema: list[Tensor], weights: list[Tensor]) -> Tensor:
    """Return the sum of squared differences between paired tensors, as a float32 0-d tensor on the EMA's device.

    One tensor at a time, so the temporary memory is that of the largest tensor, not of the model.
    """
    parts = [
        torch.linalg.vector_norm(e.float() - w.to(device=e.device, dtype=torch.float32)).square()
        for e, w in zip(ema, weights, strict=True)
    ]
    return torch.stack(parts).sum()


def exchange_(first: list[Tensor], second: list[Tensor]) -> None:
    """Exchange the storage of paired tensors without copying their values.

    Afterwards ``first[i]`` holds what ``second[i]`` held and the reverse. ``first`` may be module
    parameters or buffers (their ``.data`` is re-pointed, so optimizers that hold the parameter objects are
    unaffected); ``second`` is updated in place with the tensors that held ``first``'s values.
    """
    for index, (a, b) in enumerate(zip(first, second, strict=True)):
        previous = a.data
        a.data = b
        second[index] = previous
