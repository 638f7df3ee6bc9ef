"""What ``PostHocEMA`` puts in its snapshot folder and moves out of it.

Plain torch (no Lightning): which tensors one rank writes and where its shards sit, the file of one rank's snapshot,
and which later snapshots a resumed run moves into ``superseded/``. The file format itself is in ``_snapshots``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from lightning_ema._snapshots import (
    SUPERSEDED,
    parse_snapshot_filename,
    shard_region,
    snapshot_filename,
    write_snapshot,
)
from lightning_ema.sharding import is_sharded, reshard_all

__all__ = ["Region", "SnapshotSource", "shard_regions", "snapshot_tensors", "supersede_after", "write_rank_snapshot"]

#: A DTensor's global shape, the offset of this rank's shard in it, and whether this rank saves that shard.
Region = tuple[tuple[int, ...], tuple[int, ...], bool]


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


class SnapshotSource(Protocol):
    """What a snapshot is written from: the EMAs of a ``PostHocEMA`` and the settings of its snapshots."""

    #: the tracked widths, one per EMA.
    sigma_rels: tuple[float, ...]
    #: the power-function exponent of each EMA.
    gammas: tuple[float, ...]
    #: the dtype floating tensors are written in; ``None`` keeps theirs.
    snapshot_dtype: torch.dtype | None
    #: ``"safetensors"`` or ``"torch"``.
    file_format: str

    def ema_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """The ``state_dict``-named tensors of EMA ``index``."""
        ...


def write_rank_snapshot(
    source: SnapshotSource, folder: Path, step: int, module: nn.Module, *, rank: int, world_size: int
) -> None:
    """Write this rank's snapshot of the EMAs of ``module`` at ``step`` into ``folder``.

    Without DTensors every rank holds the same EMAs and rank 0 writes them; under FSDP2 every rank writes its own
    shards (``step-0000001000.rank1-of-2.pt``), with nothing gathered.

    Args:
        source: the EMAs and the settings of the snapshot.
        folder: the snapshot folder.
        step: the optimizer step the EMAs are as of.
        module: the LightningModule whose EMAs these are (its DTensors give the shard layout).
        rank: this process's global rank.
        world_size: the number of processes.
    """
    regions = shard_regions(module)
    if regions is None and rank != 0:
        return  # DDP: every rank holds the same EMAs; rank 0 writes them
    file_rank = None if regions is None else rank
    file_world_size = None if regions is None else world_size
    emas, shards = snapshot_tensors(
        source.ema_state_dict,
        len(source.sigma_rels),
        regions=regions,
        rank=file_rank,
        snapshot_dtype=source.snapshot_dtype,
    )
    name = snapshot_filename(step, rank=file_rank, world_size=file_world_size, file_format=source.file_format)
    write_snapshot(
        folder / name,
        step=step,
        sigma_rels=source.sigma_rels,
        gammas=source.gammas,
        emas=emas,
        shards=shards,
        rank=file_rank,
        world_size=file_world_size,
    )


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
            target = _free_name(folder / SUPERSEDED / file.name)
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(file), str(target))
            moved.append(file.name)
    return moved


def _free_name(target: Path) -> Path:
    """``target``, or ``<stem>.<n><suffix>`` with the first free ``n`` if an earlier resume moved a file there."""
    n = 1
    free = target
    while free.exists():
        n += 1
        free = target.with_name(f"{target.stem}.{n}{target.suffix}")
    return free
