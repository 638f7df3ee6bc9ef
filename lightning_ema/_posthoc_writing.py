"""What ``PostHocEMA`` puts in its snapshot folder and moves out of it, and the checks of its own arguments.

Plain torch (no Lightning): which tensors one rank writes and where its shards sit, and which later snapshots a
resumed run moves into ``superseded/``. The file format itself is in ``_snapshots``.
"""

from __future__ import annotations

import numbers
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema._snapshots import SUPERSEDED, parse_snapshot_filename, shard_region
from lightning_ema._validate import check_choice
from lightning_ema.schedules import KarrasDecay
from lightning_ema.sharding import is_sharded, reshard_all

#: A DTensor's global shape, the offset of this rank's shard in it, and whether this rank saves that shard.
Region = tuple[tuple[int, ...], tuple[int, ...], bool]

FILE_FORMATS = ("auto", "safetensors", "torch")


def shard_regions(module: nn.Module) -> dict[str, Region] | None:
    """The layout of every DTensor in the module by ``state_dict`` name, or ``None`` if the module is not sharded."""
    tensors = module.state_dict(keep_vars=True)
    if not any(is_sharded(tensor) for tensor in tensors.values()):
        return None
    reshard_all(module)  # a root unit left unsharded by validation would show full tensors
    tensors = module.state_dict(keep_vars=True)
    return {name: shard_region(tensor) for name, tensor in tensors.items() if is_sharded(tensor)}


def snapshot_tensors(
    ema_state_dict: Callable[[int], Mapping[str, Tensor]],
    count: int,
    *,
    regions: Mapping[str, Region] | None,
    rank: int | None,
    snapshot_dtype: torch.dtype | None,
) -> tuple[list[dict[str, Tensor]], dict[str, dict[str, tuple[int, ...]]]]:
    """Return the tensors this rank writes for each of ``count`` EMAs (on the CPU) and the layout of its shards.

    Args:
        ema_state_dict: the ``state_dict``-named tensors of EMA ``index``.
        count: the number of EMAs.
        regions: :func:`shard_regions` of the module (``None``: not sharded).
        rank: this rank for a sharded module, else ``None``.
        snapshot_dtype: the dtype floating tensors are written in; ``None`` keeps theirs.
    """
    emas, shards = [], {}
    for index in range(count):
        ema = {}
        for name, tensor in ema_state_dict(index).items():
            region = None if regions is None else regions.get(name)
            if region is not None and not region[2]:
                continue  # another replica of this shard saves it
            if region is None and rank not in (None, 0):
                continue  # unsharded tensors (buffers) are the same on every rank: rank 0 saves them
            if region is not None:
                shards[name] = {"shape": region[0], "offset": region[1]}
            dtype = snapshot_dtype if snapshot_dtype is not None and tensor.is_floating_point() else tensor.dtype
            ema[name] = tensor.detach().to(device="cpu", dtype=dtype)
        emas.append(ema)
    return emas, shards


def supersede_after(folder: Path, step: int, *, rank: int, world_size: int, sharded: bool) -> list[str]:
    """Move the snapshot files of steps after ``step`` that ``rank`` is responsible for into ``superseded/``.

    Returns:
        The names of the files moved, in order.
    """
    moved = []
    for file in sorted(folder.iterdir()):
        parsed = parse_snapshot_filename(file.name)
        if parsed is None or parsed[0] <= step:
            continue
        owner = parsed[1]
        mine = owner == rank or (rank == 0 and (owner is None or not sharded or owner >= world_size))
        if mine:
            target = folder / SUPERSEDED / file.name
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(file), str(target))
            moved.append(file.name)
    return moved


def check_sigma_rels(value: Any) -> tuple[float, ...]:
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


def resolve_file_format(value: Any) -> str:
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
