"""Pure tensor kernels of the EMA: names, selection, update, copy and exchange.

Nothing here knows about Lightning or keeps state; every function works on lists of tensors that the
caller groups by (device, dtype), so that each call is one multi-tensor (``torch._foreach_*``) kernel.
"""

from __future__ import annotations

import fnmatch
import math
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "WRAPPER_PREFIXES",
    "canonical_name",
    "copy_",
    "ema_dtype_for",
    "exchange_",
    "finite_each",
    "gated_copy_",
    "gated_lerp_",
    "is_selected",
    "lerp_",
    "nonfinite_mask",
    "range_limit",
    "screen_into_",
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


def range_limit(weight_dtype: torch.dtype, ema_dtype: torch.dtype) -> float:
    """Return the largest magnitude of a weight that an EMA of ``ema_dtype`` can hold, or ``inf`` if it holds all.

    An EMA narrower than its weights (float16 of float32 weights, float32 of float64 ones) turns a finite weight
    beyond its range into an infinity, which the non-finite check must refuse like one.

    Example:
        >>> range_limit(torch.float32, torch.float16), range_limit(torch.bfloat16, torch.float32)
        (65504.0, inf)
    """
    if not (weight_dtype.is_floating_point and ema_dtype.is_floating_point):
        return math.inf
    largest = torch.finfo(ema_dtype).max
    return float(largest) if largest < torch.finfo(weight_dtype).max else math.inf


@torch.no_grad()
def lerp_(ema: list[Tensor], weights: list[Tensor], weight: float) -> None:
    """Move each EMA tensor towards its weight in place: ``ema += weight * (w - ema)``.

    One fused ``torch._foreach_lerp_``. ``lerp`` refuses mixed dtypes (a float32 EMA of bfloat16 weights), so
    such weights are first widened (exactly) to the EMA's dtype; :class:`lightning_ema._groups.Storage` does that
    block by block (:class:`lightning_ema._blocks.Block`) into a buffer that stays in cache, so that the EMA is
    still read and written once.

    Args:
        ema: EMA tensors, all on one device.
        weights: the current weights, paired with ``ema`` by position and on the same device.
        weight: ``1 - decay``.
    """
    if ema:
        torch._foreach_lerp_(ema, _same_dtype(ema, weights), weight)


def _same_dtype(ema: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    if ema[0].dtype == weights[0].dtype:
        return weights
    return [w.to(e.dtype) for e, w in zip(ema, weights, strict=True)]


@torch.no_grad()
def copy_(destination: list[Tensor], source: list[Tensor], *, non_blocking: bool = False) -> None:
    """Copy ``source`` into ``destination`` in place, converting device and dtype as needed."""
    if destination:
        torch._foreach_copy_(destination, source, non_blocking=non_blocking)


@torch.no_grad()
def screen_into_(tensors: Sequence[Tensor], slots: Sequence[tuple[Tensor, Tensor]], *, extremes: bool = False) -> None:
    """Screen each tensor for NaN and infinity into its pair of 0-d slots (of its dtype), allocating nothing.

    The slots become non-finite if the tensor holds a NaN or an infinity. The screen is the tensor's sum (in
    the first slot): ``+inf`` and ``-inf`` together give NaN. A sum can also overflow from large finite values,
    so a non-finite slot only says "look closer" (:func:`finite_each` decides). Float16 sums overflow far too
    easily (65504 is its largest value), so a float16 tensor gets its minimum and maximum instead, which are
    exact; so does every tensor with ``extremes`` (an EMA narrower than its weights checks their range, see
    :func:`range_limit`). Either way it is one read of the tensor, at memory bandwidth.
    """
    for tensor, (first, second) in zip(tensors, slots, strict=True):
        if extremes or tensor.dtype == torch.float16:
            torch.aminmax(tensor, out=(first, second))
        else:
            torch.sum(tensor, tuple(range(tensor.dim())), out=first)


def finite_each(tensors: Sequence[Tensor], *, limit: float = math.inf) -> list[bool]:
    """Return, exactly and on the host, whether each tensor holds only finite values (the slow, sure check).

    ``limit``: also whether every magnitude is at most this (see :func:`range_limit`).
    """
    if math.isinf(limit):
        return [bool(torch.isfinite(tensor).all()) for tensor in tensors]
    # Compared on the host in double: `limit` need not be a value of the tensor's dtype. NaN compares False.
    extremes = [torch.aminmax(tensor) if tensor.numel() else (tensor.new_zeros(()),) * 2 for tensor in tensors]
    return [-limit <= float(low) and float(high) <= limit for low, high in extremes]


@torch.no_grad()
def nonfinite_mask(tensors: list[Tensor], *, limit: float = math.inf) -> Tensor:
    """Return a boolean tensor, on the tensors' device, that is ``True`` exactly for each one holding NaN or inf.

    The host never reads a value here, so on an accelerator the answer stays on the device: one fused
    ``_foreach_norm(ord=inf)`` (the largest absolute value is non-finite exactly when the tensor holds a NaN or an
    infinity; no finite value can overflow it). Empty tensors are never flagged. ``limit``: also flag a tensor
    holding a magnitude above it (see :func:`range_limit`).
    """
    nonempty = [t for t in tensors if t.numel()]
    if len(nonempty) == len(tensors):
        largest = torch.stack(torch._foreach_norm(tensors, float("inf")))
        if math.isinf(limit):
            return ~torch.isfinite(largest)
        # A Python number is compared in the tensor's dtype, where `limit` may round up (65504 in bfloat16 is
        # 65536): compare half-precision maxima in float32, which holds them and every limit exactly.
        return ~((largest.float() if largest.dtype in _HALF else largest) <= limit)  # NaN compares False
    mask = torch.zeros(len(tensors), dtype=torch.bool, device=tensors[0].device)
    if nonempty:
        positions = torch.tensor([i for i, t in enumerate(tensors) if t.numel()], device=mask.device)
        mask[positions] = nonfinite_mask(nonempty, limit=limit)
    return mask


#: Devices whose ``torch._fused_sgd_`` reads ``found_inf`` inside the kernel (CUDA) or where reading it is free (CPU).
_GATED_DEVICES = ("cpu", "cuda")


@torch.no_grad()
def gated_lerp_(ema: list[Tensor], weights: list[Tensor], weight: float, skip: Tensor) -> None:
    """:func:`lerp_` unless ``skip`` (a float32 0-d tensor on the EMA's device) is ``1``; the host reads nothing.

    A lerp with weight 0 cannot skip: ``ema + 0 * (nan - ema)`` is NaN. Torch's fused SGD kernel can, the way
    ``GradScaler`` skips fused optimizer steps: it reads ``found_inf`` on the device and returns before touching
    anything, so a skipped update leaves the EMA bit for bit as it was. With ``weight_decay=-1`` and ``lr=-weight``
    its step ``p -= lr * (g + weight_decay * p)`` with ``g = w`` is ``p + weight * (w - p)``, the lerp (on CPU bit
    for bit the same as ``lerp_`` for float32 and float64 and weights below 0.5). Other cases (weights of 0.5 or
    more, where ``lerp`` switches formula; half-precision EMAs, which that kernel rounds differently; tensors that
    are not contiguous; devices without it; meta tensors) select with ``torch.where`` per tensor, which costs a
    temporary of one tensor.
    """
    if not ema:
        return
    weights = _same_dtype(ema, weights)
    fused = weight < 0.5 and ema[0].device.type in _GATED_DEVICES and ema[0].dtype in (torch.float32, torch.float64)
    # The fused kernel pairs elements by memory position: only for contiguous pairs (a channels_last weight is not).
    fast = [fused and e.is_contiguous() and w.is_contiguous() for e, w in zip(ema, weights, strict=True)]
    if any(fast):
        torch._fused_sgd_(
            [e for e, f in zip(ema, fast, strict=True) if f],
            [w for w, f in zip(weights, fast, strict=True) if f],
            [],
            weight_decay=-1.0,
            momentum=0.0,
            lr=-_opmath_rounded(weight, ema[0].dtype),
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
            found_inf=skip,
        )
    if all(fast):
        return
    keep = skip.bool()
    for e, w, f in zip(ema, weights, fast, strict=True):
        if not f:
            candidate = e.clone()
            candidate.lerp_(w, weight)
            e.copy_(torch.where(keep, e, candidate, out=candidate))


@torch.no_grad()
def gated_copy_(destination: list[Tensor], source: list[Tensor], skip: Tensor) -> None:
    """:func:`copy_` unless ``skip`` (a 0-d tensor on the destination's device) is non-zero; the host reads nothing."""
    if not destination:
        return
    keep = skip.bool()
    for d, s in zip(destination, source, strict=True):
        d.copy_(torch.where(keep, d, s.to(d.dtype)))


def _opmath_rounded(weight: float, dtype: torch.dtype) -> float:
    """``weight`` as the lerp kernels see it: rounded to float32 unless the EMA is float64."""
    if dtype == torch.float64:
        return weight
    return float(struct.unpack("f", struct.pack("f", weight))[0])


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
