"""Post-hoc EMA snapshot files: names, the format, atomic writes, reading, listing a folder, DTensor shards.

Public through :mod:`lightning_ema.posthoc`, whose docstring describes the format. This module imports torch
only (and safetensors when a ``.safetensors`` file is read or written).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "lightning-ema-posthoc"
VERSION = 1
#: The subfolder where snapshots that a resumed run replaces are moved; never read.
SUPERSEDED = "superseded"

_FILE_NAME = re.compile(r"step-(\d+)(?:\.rank(\d+)-of-(\d+))?\.(pt|safetensors)")
_SUFFIXES = {"torch": ".pt", "safetensors": ".safetensors"}


# --------------------------------------------------------------------------------------------------
# Files: names, atomic writes, reading
# --------------------------------------------------------------------------------------------------


def snapshot_filename(
    step: int, *, rank: int | None = None, world_size: int | None = None, file_format: str = "torch"
) -> str:
    """Return the file name of a snapshot: ``step-0000001000.pt``, ``step-0000001000.rank1-of-2.safetensors``.

    >>> snapshot_filename(1000), snapshot_filename(20, rank=1, world_size=2, file_format="safetensors")
    ('step-0000001000.pt', 'step-0000000020.rank1-of-2.safetensors')
    """
    if file_format not in _SUFFIXES:
        raise ValueError(f"`file_format` must be 'torch' or 'safetensors', got {file_format!r}.")
    ranked = "" if rank is None else f".rank{rank}-of-{world_size}"
    return f"step-{step:010d}{ranked}{_SUFFIXES[file_format]}"


def parse_snapshot_filename(name: str) -> tuple[int, int | None, int | None] | None:
    """Return ``(step, rank, world_size)`` of a snapshot file name (``None`` for an unranked file), or ``None``.

    >>> parse_snapshot_filename("step-0000000020.rank1-of-2.pt"), parse_snapshot_filename("last.ckpt")
    ((20, 1, 2), None)
    """
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        return None
    step, rank, world_size = match.group(1), match.group(2), match.group(3)
    return int(step), None if rank is None else int(rank), None if world_size is None else int(world_size)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary)`` and ``os.replace``, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable where the platform allows it
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(directory)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(directory)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ValueError(
            "Reading or writing .safetensors files needs the safetensors package: pip install safetensors."
        ) from error
    return safetensors


def _unshared(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Give tensors that share storage (tied weights) their own, and make all contiguous: safetensors needs it."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        shared = pointer in seen and tensor.numel() > 0
        result[name] = tensor.clone() if shared else tensor.contiguous()
        seen.add(pointer)
    return result


def save_state_dict(tensors: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write a plain state dict atomically: safetensors for a ``.safetensors`` suffix, else ``torch.save``.

    Raises:
        ValueError: for a ``.safetensors`` path without the safetensors package.
    """
    output = Path(path)
    if output.suffix == ".safetensors":
        save_file = _safetensors().torch.save_file
        contiguous = _unshared(tensors)
        _atomic_write(output, lambda temporary: save_file(contiguous, str(temporary)))
    else:
        state = dict(tensors)
        _atomic_write(output, lambda temporary: torch.save(state, temporary))


def write_snapshot(
    path: str | os.PathLike[str],
    *,
    step: int,
    sigma_rels: Sequence[float],
    gammas: Sequence[float],
    emas: Sequence[Mapping[str, Tensor]],
    shards: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Write one snapshot file atomically; the format follows the suffix (``.safetensors`` or ``.pt``).

    Args:
        path: the file to write; :func:`snapshot_filename` gives the name :func:`list_snapshots` finds.
        step: the optimizer step the EMAs are as of, ``>= 1``.
        sigma_rels: the relative width of each EMA.
        gammas: the exponent of each EMA.
        emas: one mapping ``state_dict name -> tensor`` per EMA, in the order of ``sigma_rels``.
        shards: for tensors that are one rank's part of a larger tensor, ``{name: {"shape": global shape,
            "offset": index of the part's first element along each dimension}}``.
        rank: this rank, for a file that holds one rank's shards (``None``: the whole model).
        world_size: the number of ranks whose files make up the snapshot (with ``rank``).

    Raises:
        ValueError: if the arguments do not describe a snapshot.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"`step` must be an integer >= 1, got {step!r}.")
    if not (len(sigma_rels) == len(gammas) == len(emas)) or not emas:
        raise ValueError(
            f"`sigma_rels`, `gammas` and `emas` must have one entry per EMA, got {len(sigma_rels)}, {len(gammas)} "
            f"and {len(emas)}."
        )
    if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < int(world_size or 0)):
        raise ValueError(
            f"`rank` must be in [0, world_size) or both None, got rank={rank!r}, world_size={world_size!r}."
        )
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "sigma_rels": [float(value) for value in sigma_rels],
        "gammas": [float(value) for value in gammas],
        "rank": rank,
        "world_size": world_size,
        "shards": {
            name: {"shape": [int(n) for n in region["shape"]], "offset": [int(n) for n in region["offset"]]}
            for name, region in (shards or {}).items()
        },
    }
    output = Path(path)
    if output.suffix == ".safetensors":
        save_file = _safetensors().torch.save_file
        tensors = _unshared(
            {f"{index}/{name}": tensor for index, ema in enumerate(emas) for name, tensor in ema.items()}
        )
        metadata = {"format": FORMAT, "header": json.dumps(header)}
        _atomic_write(output, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    else:
        state = {**header, "emas": [dict(ema) for ema in emas]}
        _atomic_write(output, lambda temporary: torch.save(state, temporary))


#: Headers already read, by (path, inode, modification time, size): an atomic replace changes the key. Reading a
#: ``.pt`` header means loading its pickle (tens of milliseconds for hundreds of tensors), and a sweep lists the
#: folder once per width.
_HEADERS: dict[tuple[str, int, int, int], dict[str, Any]] = {}
_HEADERS_KEPT = 4096


def _read_header(path: Path) -> dict[str, Any]:
    status = path.stat()
    key = (str(path.resolve()), status.st_ino, status.st_mtime_ns, status.st_size)
    cached = _HEADERS.get(key)
    if cached is None:
        cached = _read_header_uncached(path)
        if len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.clear()
        _HEADERS[key] = cached
    return dict(cached)


def _read_header_uncached(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        safetensors = _safetensors()
        try:  # a damaged file (empty, truncated) raises safetensors' own SafetensorError
            with safetensors.safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:
            raise ValueError(f"Cannot read the snapshot {str(path)!r}: {error}") from error
        if metadata.get("format") != FORMAT or "header" not in metadata:
            raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot (no {FORMAT!r} metadata).")
        header = dict(json.loads(metadata["header"]))
    else:
        state = _torch_load(path)
        header = {key: value for key, value in state.items() if key != "emas"}
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot: format {header.get('format')!r}.")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise ValueError(
            f"{str(path)!r} has snapshot format version {header.get('version')!r}; this lightning-ema reads versions "
            f"up to {VERSION}. Upgrade lightning-ema to read it."
        )
    return header


def _torch_load(path: Path) -> dict[str, Any]:
    try:  # mmap: the tensors are read from disk only when they are used
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"Cannot read the snapshot {str(path)!r}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot: it holds a {type(state).__name__}.")
    return state


def read_snapshot(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """Read one snapshot file: its header (every entry but the tensors) and one ``name -> tensor`` dict per EMA.

    Raises:
        ValueError: if the file is not a snapshot of a format version this package reads.
    """
    file = Path(path)
    header = _read_header(file)
    count = len(header["sigma_rels"])
    if file.suffix == ".safetensors":
        emas: list[dict[str, Tensor]] = [{} for _ in range(count)]
        with _safetensors().safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                index, _, name = key.partition("/")
                emas[int(index)][name] = handle.get_tensor(key)
    else:
        emas = [dict(ema) for ema in _torch_load(file)["emas"]]
    if len(emas) != count:
        raise ValueError(f"{str(file)!r} holds {len(emas)} EMAs for {count} sigma_rels.")
    return header, emas


# --------------------------------------------------------------------------------------------------
# The folder: which snapshots exist
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The snapshot of one step: the EMA of every tracked ``sigma_rel`` as of ``step``.

    Attributes:
        step: the optimizer step the EMAs are as of.
        sigma_rels: the relative width of each EMA, in the order they are stored.
        gammas: the exponent of each EMA.
        files: the file, or one file per rank (by rank) for a sharded model.
    """

    step: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    files: tuple[Path, ...]


def list_snapshots(dirpath: str | os.PathLike[str]) -> list[Snapshot]:
    """Return the complete snapshots in ``dirpath``, by step.

    A sharded snapshot is complete when every rank's file is there; an incomplete one (a run stopped between the
    ranks' writes) is left out with a warning. The ``superseded`` subfolder is not read.

    Raises:
        FileNotFoundError: if ``dirpath`` is not a folder.
        ValueError: if a file is not a readable snapshot, or one step has several complete snapshots.
    """
    folder = Path(dirpath)
    if not folder.is_dir():
        raise FileNotFoundError(f"No snapshot folder at {str(folder)!r}.")
    sets: dict[tuple[int, int | None], dict[int | None, tuple[Path, dict[str, Any]]]] = {}
    for file in sorted(folder.iterdir()):
        if not _FILE_NAME.fullmatch(file.name) or not file.is_file():
            continue
        header = _read_header(file)
        world_size = header.get("world_size")
        sets.setdefault((int(header["step"]), world_size), {})[header.get("rank")] = (file, header)
    by_step: dict[int, list[Snapshot]] = {}
    for (step, world_size), members in sorted(sets.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        expected = [None] if world_size is None else list(range(world_size))
        missing = [rank for rank in expected if rank not in members]
        if missing:
            warnings.warn(
                f"The snapshot of step {step} in {str(folder)!r} lacks the files of ranks {missing} (of {world_size}); "
                "it is left out.",
                UserWarning,
                stacklevel=2,
            )
            continue
        headers = [members[rank][1] for rank in expected]
        sigma_rels = tuple(float(value) for value in headers[0]["sigma_rels"])
        gammas = tuple(float(value) for value in headers[0]["gammas"])
        if any(tuple(h["sigma_rels"]) != sigma_rels for h in headers):
            raise ValueError(
                f"The rank files of the snapshot of step {step} in {str(folder)!r} disagree on sigma_rels."
            )
        snapshot = Snapshot(step, sigma_rels, gammas, tuple(members[rank][0] for rank in expected))
        by_step.setdefault(step, []).append(snapshot)
    duplicated = {step: [str(f) for s in found for f in s.files] for step, found in by_step.items() if len(found) > 1}
    if duplicated:
        raise ValueError(
            f"Several snapshots of the same step in {str(folder)!r}: {duplicated}. Keep one set of files per step."
        )
    return [found[0] for _, found in sorted(by_step.items())]


# --------------------------------------------------------------------------------------------------
# Shards: where one rank's part of a DTensor sits
# --------------------------------------------------------------------------------------------------


def shard_region(tensor: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Return a DTensor's global shape, the offset of this rank's local shard in it, and whether this rank saves it.

    ``Shard(dim)`` placements split like ``torch.chunk`` (the last ranks may hold smaller or empty shards), one
    mesh dimension after another; over a ``Replicate()`` mesh dimension only the rank at coordinate 0 saves its
    copy, so the saved parts cover the tensor exactly once.

    Raises:
        ValueError: for placements other than ``Shard`` and ``Replicate`` (``Partial``, strided shards), or a local
            shard whose shape does not match.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    shape = tuple(int(n) for n in tensor.shape)
    local, offset = list(shape), [0] * len(shape)
    saves = coordinate is not None
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard:
            dim = placement.dim % max(1, len(shape))
            parts, index = mesh.size(mesh_dim), coordinate[mesh_dim] if coordinate else 0
            chunk = -(-local[dim] // parts)
            start = min(index * chunk, local[dim])
            offset[dim] += start
            local[dim] = max(0, min(chunk, local[dim] - start))
        elif isinstance(placement, Replicate):
            saves = saves and bool(coordinate) and coordinate[mesh_dim] == 0
        else:
            raise ValueError(
                f"Post-hoc EMA snapshots support DTensors sharded with Shard(dim) or Replicate(), got {placement!r}."
            )
    actual = tuple(tensor.to_local().shape)  # type: ignore[attr-defined]
    if tuple(local) != actual:
        raise ValueError(f"A local shard of shape {actual} does not match its layout (expected {tuple(local)}).")
    return shape, tuple(offset), saves


# Public, and so pickled and shown, as lightning_ema.posthoc.Snapshot.
Snapshot.__module__ = "lightning_ema.posthoc"
