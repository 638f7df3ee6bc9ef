"""Which tensors of a module are averaged, under which names, and how saved tensors pair with them.

Pure torch. Tensors are chosen by their canonical ``state_dict`` name (wrapper components removed) through the
``include``/``exclude`` glob patterns; a tensor reachable under several names (tied weights) is tracked once.
Saved EMA tensors always pair with the module's tensors by name, never by position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_ema import functional as F
from lightning_ema import sharding as S
from lightning_ema._state_validation import dtype_fits
from lightning_ema.errors import EMAStateError

__all__ = [
    "AVERAGE",
    "COPY",
    "KEEP",
    "TRUNCATE",
    "Selected",
    "align_names",
    "fingerprint",
    "localize",
    "select",
    "target_tensors",
    "unmatched_patterns",
]

#: How a selected tensor enters the EMA: averaged (floating point), or copied (integers, ``buffers="copy"``).
AVERAGE, COPY = "average", "copy"
#: Integer buffers under ``integer_buffers="average"`` (averaged in float32, truncated) or ``"keep"`` (copied
#: only by the copies up to ``start_step``).
TRUNCATE, KEEP = "truncate", "keep"
_INTEGER_KINDS = {"copy": COPY, "average": TRUNCATE, "keep": KEEP}


@dataclass(frozen=True)
class Selected:
    """One tracked tensor: its ``state_dict`` names, the tensor, and how the EMA treats it."""

    names: tuple[str, ...]
    live: Tensor  # the tensor itself, or for a DTensor the view of this rank's shard
    kind: str
    buffer: bool
    sharding: S.Sharding | None = None


def select(
    module: nn.Module,
    *,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    buffers: str,
    integer_buffers: str = "copy",
) -> list[Selected]:
    """Return the tensors of ``module`` that an EMA with these settings tracks, one entry per distinct tensor.

    ``exclude`` is extended by the module's own ``ema_exclude`` patterns, if it declares any: the protocol by
    which a module says that some of its tensors are averages already (a mean teacher's teacher).
    """
    declared = tuple(getattr(module, "ema_exclude", ()) or ())
    patterns = tuple(exclude or ()) + declared or None
    parameters = {id(p) for p in module.parameters()}
    names_of: dict[int, list[str]] = {}
    tensor_of: dict[int, Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, Tensor):
            continue
        if not F.is_selected(F.canonical_name(name), include, patterns):
            continue
        names_of.setdefault(id(tensor), []).append(name)
        tensor_of[id(tensor)] = tensor
    selected = []
    for key, names in names_of.items():
        tensor = tensor_of[key]
        floating = tensor.is_floating_point()
        if key in parameters:
            kind = AVERAGE if floating else COPY
        elif buffers == "ignore":
            continue
        else:
            kind = AVERAGE if floating and buffers == "average" else COPY
            if not floating and buffers == "average":
                kind = _INTEGER_KINDS[integer_buffers]
        if S.is_sharded(tensor):
            selected.append(
                Selected(tuple(names), S.local_view(tensor), kind, key not in parameters, S.sharding_of(tensor))
            )
        else:
            selected.append(Selected(tuple(names), tensor, kind, key not in parameters))
    return selected


def unmatched_patterns(module: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Return the glob patterns that match no canonical ``state_dict`` name of ``module`` (a typo, most often)."""
    import fnmatch

    names = [F.canonical_name(name) for name in module.state_dict()]
    return [pattern for pattern in patterns or () if not fnmatch.filter(names, pattern)]


def fingerprint(module: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Return, by ``state_dict`` name, what identifies each tensor of ``module`` now.

    (object id, storage address, dtype, shape, device): if any of them changes, the tensor was replaced or moved
    behind the EMA's back (a buffer assigned out of place, ``module.to(...)``, SWA's BatchNorm update) and the EMA
    must pair its averages with the new tensor by name. Cheap (no tensor is read), but a ``state_dict`` walk:
    call it where evaluation or an epoch starts, not per step.
    """
    result = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if isinstance(tensor, Tensor):
            local = S.local_view(tensor)
            address = 0 if local.is_meta else local.data_ptr()
            result[name] = (id(tensor), address, local.dtype, tuple(local.shape), local.device)
    return result


def target_tensors(target: nn.Module, selected: list[Selected]) -> dict[str, Tensor]:
    """Return ``target``'s ``state_dict`` tensors (the objects, not copies) of the names that are selected."""
    wanted = {F.canonical_name(name) for item in selected for name in item.names}
    return {
        name: tensor
        for name, tensor in target.state_dict(keep_vars=True).items()
        if isinstance(tensor, Tensor) and F.canonical_name(name) in wanted
    }


def localize(source: Mapping[str, Tensor], selected: list[Selected]) -> Mapping[str, Tensor]:
    """Replace full tensors of sharded entries by this rank's shard (a full-file checkpoint of a sharded run)."""
    sharded = {name: item for item in selected if item.sharding is not None for name in item.names}
    if not sharded:
        return source
    result = dict(source)
    for name, item in sharded.items():
        tensor = source.get(name)
        sharding = item.sharding
        if tensor is not None and sharding is not None and tensor.shape != item.live.shape:
            if tensor.shape == sharding.shape:
                result[name] = S.cut_local_shard(tensor.to(item.live.device), sharding)
    return result


def align_names(source: Mapping[str, Tensor], selected: list[Selected]) -> Mapping[str, Tensor]:
    """Return ``source`` keyed by the module's names, or raise listing every name or shape that differs.

    Names that differ only by wrapper components (a checkpoint of a compiled module loaded into an
    uncompiled one) are matched through their canonical form.

    Raises:
        EMAStateError: naming every missing, unexpected or differently shaped tensor, and every EMA whose dtype
            cannot hold its weight; nothing is changed.
    """
    expected = {name: item.live.shape for item in selected for name in item.names}
    if set(source) != set(expected):
        by_canonical = {F.canonical_name(name): name for name in source}
        renamed = {name: by_canonical.get(F.canonical_name(name)) for name in expected}
        if None not in renamed.values() and len(source) == len(expected):
            source = {name: source[old] for name, old in renamed.items() if old is not None}
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected))
    mismatched = sorted(
        f"{name}: EMA {tuple(source[name].shape)} vs model {tuple(shape)}"
        for name, shape in expected.items()
        if name in source and source[name].shape != shape
    )
    # issue 13: an EMA whose dtype cannot hold its weight (an int64 EMA of a float weight) is refused, not cast
    dtypes = {name: item.live.dtype for item in selected for name in item.names}
    wrong_dtype = sorted(
        f"{name}: EMA {source[name].dtype} vs model {dtype}"
        for name, dtype in dtypes.items()
        if name in source and not dtype_fits(source[name].dtype, dtype)
    )
    if missing or unexpected or mismatched or wrong_dtype:
        problems = []
        if missing:
            problems.append(f"missing from the EMA: {missing}")
        if unexpected:
            problems.append(f"not in the model: {unexpected}")
        if mismatched:
            problems.append(f"shape differs: {mismatched}")
        if wrong_dtype:
            problems.append(f"dtype cannot hold the weight: {wrong_dtype}")
        raise EMAStateError("The EMA state does not match the model, nothing was loaded; " + "; ".join(problems) + ".")
    return source
