"""Distributed checkpoint folders: reading one in a single process, and the sharded EMA tensors in it.

A distributed checkpoint (``ModelParallelStrategy``'s default) routes only ``checkpoint["state_dict"]`` through
``torch.distributed.checkpoint``; a sharded EMA's tensors are saved there under :func:`shard_key`, and the rest
of the callback state goes to ``meta.pt``. The layout is described in :mod:`lightning_ema.checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema._files import load_file
from lightning_ema._state_validation import FORMAT, check_ema_state
from lightning_ema.errors import EMAStateError

__all__ = ["SHARD_PREFIX", "load_distributed_checkpoint", "load_sharded_ema", "shard_key"]

SHARD_PREFIX = "__ema__/"
_METADATA_FILE = "meta.pt"  # what ModelParallelStrategy names the non-tensor part of a distributed checkpoint


def shard_key(state_key: str, index: int, name: str) -> str:
    """The ``checkpoint["state_dict"]`` key under which a sharded EMA tensor is saved in a distributed checkpoint."""
    return f"{SHARD_PREFIX}{state_key}/{index}/{name}"


def load_distributed_checkpoint(path: Path, *, weights_only: bool) -> dict[str, Any]:
    """Read a distributed checkpoint folder in one process: ``meta.pt`` plus the ``state_dict`` tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lightning_ema._dcp import load_tensors, read_metadata

    if not (path / _METADATA_FILE).is_file():
        raise ValueError(
            f"{str(path)!r} is a folder without {_METADATA_FILE}: not a distributed checkpoint written by Lightning."
        )
    loaded = load_file(path / _METADATA_FILE, weights_only=weights_only)
    if not isinstance(loaded, dict):
        raise ValueError(f"{str(path / _METADATA_FILE)!r} holds a {type(loaded).__name__}, not a checkpoint dict.")
    checkpoint = dict(loaded)
    metadata = read_metadata(path, weights_only=weights_only)
    stored = metadata.state_dict_metadata
    tensors = {
        key.removeprefix("state_dict."): meta
        for key, meta in stored.items()
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)
    }
    _refuse_oversized(path, metadata, tensors)
    wanted = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in tensors.items()}
    request = {"state_dict": wanted}
    load_tensors(request, path, metadata, no_dist=True)
    weights = request["state_dict"]
    callbacks = checkpoint.get("callbacks") or {}
    if not isinstance(callbacks, Mapping):
        raise EMAStateError(
            f"checkpoint['callbacks'] must be a dict of callback states, got a {type(callbacks).__name__}."
        )
    callbacks = dict(callbacks)
    for key, state in callbacks.items():
        if isinstance(state, Mapping) and state.get("format") == FORMAT and state.get("sharded"):
            callbacks[key] = _with_shards(path, str(key), state, weights)
    checkpoint["callbacks"] = callbacks
    checkpoint["state_dict"] = {key: value for key, value in weights.items() if not key.startswith(SHARD_PREFIX)}
    return checkpoint


def _with_shards(path: Path, key: str, state: Mapping[str, Any], weights: dict[str, Tensor]) -> dict[str, Any]:
    """A copy of a sharded callback state whose EMAs hold the consolidated shards read from the folder."""
    layout = check_ema_state(state, state_key=key, tensors=False)
    missing = sorted(
        shard_key(key, index, name)
        for index in range(len(layout["emas"]))
        for name in layout.get("sharded", ())
        if shard_key(key, index, name) not in weights
    )
    if missing:
        raise EMAStateError(f"The distributed checkpoint {str(path)!r} lacks the EMA shards {missing}.")
    result = dict(state)
    result["emas"] = [
        {**ema, **{name: weights.pop(shard_key(key, index, name)) for name in layout.get("sharded", ())}}
        for index, ema in enumerate(layout["emas"])
    ]
    return result


def _refuse_oversized(path: Path, metadata: Any, tensors: Mapping[str, Any]) -> None:
    """Refuse an index that claims more tensor bytes than the folder's files hold (it would exhaust memory)."""
    storage = metadata.storage_data.values()
    if any(getattr(info, "transform_descriptors", None) for info in storage):
        return  # compressed files: their size says nothing about the tensors'
    claimed = 0
    for meta in tensors.values():
        count = 1
        for size in meta.size:
            count *= size
        claimed += count * meta.properties.dtype.itemsize
    available = sum(
        (path / name).stat().st_size for name in {info.relative_path for info in storage} if (path / name).is_file()
    )
    if claimed > available:
        raise ValueError(
            f"{str(path / '.metadata')!r} describes {claimed} bytes of tensors, but the folder's tensor files hold "
            f"{available}: the checkpoint is incomplete or its index is wrong."
        )


def load_sharded_ema(path: str | os.PathLike[str], state_key: str, state: dict[str, Any], module: nn.Module) -> None:
    """Fill ``state["emas"]`` with this rank's EMA shards from a distributed checkpoint folder (all ranks call it).

    The folder's ``.metadata`` is read by :func:`lightning_ema._dcp.read_metadata`, which unpickles nothing but
    torch's metadata classes.

    Raises:
        EMAStateError: if the folder lacks a shard the state lists; nothing is changed then.
        ValueError: if the folder's ``.metadata`` is not a valid index (or holds anything else).
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lightning_ema._dcp import load_tensors, read_metadata
    from lightning_ema.sharding import reshard_all

    metadata = read_metadata(Path(path))
    stored = metadata.state_dict_metadata
    reshard_all(module)
    live = module.state_dict(keep_vars=True)
    keys = {
        (index, name): shard_key(state_key, index, name)
        for index in range(len(state["emas"]))
        for name in state["sharded"]
    }
    missing = sorted(
        key
        for (_, name), key in keys.items()
        if not isinstance(stored.get(f"state_dict.{key}"), TensorStorageMetadata) or name not in live
    )
    if missing:
        raise EMAStateError(
            f"The distributed checkpoint {str(path)!r} lacks EMA shards or the model their names: {missing}."
        )
    placeholders = {
        key: torch.empty_like(live[name], dtype=stored[f"state_dict.{key}"].properties.dtype)
        for (_, name), key in keys.items()
    }
    load_tensors({"state_dict": placeholders}, Path(path), metadata)
    for (index, name), key in keys.items():
        state["emas"][index][name] = placeholders[key].to_local().clone()  # type: ignore[attr-defined]
