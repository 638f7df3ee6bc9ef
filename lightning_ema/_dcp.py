"""Distributed checkpoint folders (``torch.distributed.checkpoint``) read without running code from them.

A folder written by ``ModelParallelStrategy`` holds ``meta.pt`` (read with ``torch.load(weights_only=...)``), the
tensor files ``__<rank>_<n>.distcp`` (read by torch with ``weights_only=True``) and ``.metadata``, the index of
every tensor, which ``FileSystemReader.read_metadata`` reads with a plain ``pickle.load``: a crafted ``.metadata``
would run any code it likes. Here ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which resolves only the
classes ``torch.distributed.checkpoint`` writes there (its metadata dataclasses, ``torch.Size``, dtypes and
layouts, paths) and refuses every other global, then checked for shape (a file index that stays inside the folder,
sizes that are counts). The plain ``pickle.load`` is used only when the caller opted in with ``weights_only=False``.
Tensors are then read through :class:`_CheckedReader`, a ``FileSystemReader`` that hands torch the metadata read
here instead of unpickling the file again.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader

__all__ = ["METADATA_FILE", "CheckedReader", "load_tensors", "read_metadata"]

METADATA_FILE = ".metadata"

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    *(
        (_METADATA_MODULE, name)
        for name in (
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "WindowsPath"),
}


class _Refused(pickle.UnpicklingError):
    """``.metadata`` asked for something its own classes never need (a global, a persistent id)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata``, resolving only the globals that ``torch.distributed.checkpoint`` writes there."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _ALLOWED_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise _Refused(f"the global {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"a persistent id ({pid!r})")


def _check(metadata: Any, where: str) -> Any:
    """Return ``metadata`` if it has the shape torch writes; raise ``ValueError`` naming what is off."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    def wrong(what: str) -> ValueError:
        return ValueError(f"{where} is not a valid distributed checkpoint index: {what}.")

    if not isinstance(metadata, Metadata):
        raise wrong(f"it holds a {type(metadata).__name__}, not a Metadata")
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise wrong("its `state_dict_metadata` is not a dict")
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise wrong(f"the key {key!r} is not a string")
        if isinstance(entry, TensorStorageMetadata):
            size = entry.size
            if not isinstance(size, torch.Size) or any(n < 0 for n in size):
                raise wrong(f"{key!r} has the size {size!r}")
            if not isinstance(getattr(entry.properties, "dtype", None), torch.dtype):
                raise wrong(f"{key!r} has no dtype")
        elif not isinstance(entry, BytesStorageMetadata):
            raise wrong(f"{key!r} is described by a {type(entry).__name__}")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise wrong("its `storage_data` is not a dict")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise wrong(f"an entry of `storage_data` is a {type(info).__name__}")
        relative = info.relative_path
        if not isinstance(relative, str) or not relative or Path(relative).name != relative or relative in ("..", "."):
            raise wrong(f"{index.fqn!r} is stored in {relative!r}, which is not a file of the folder")
        for field in ("offset", "length"):
            value = getattr(info, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise wrong(f"{index.fqn!r} has the {field} {value!r}")
    return metadata


def read_metadata(folder: Path, *, weights_only: bool = True) -> Any:
    """Read and check ``folder/.metadata``; with ``weights_only`` (the default) only torch's metadata classes load.

    Raises:
        ValueError: if the folder has no ``.metadata``, if it holds a global that a metadata file never holds (it
            was not loaded; ``weights_only=False`` is the way out for a folder you trust), or if it is truncated or
            malformed.
    """
    file = folder / METADATA_FILE
    where = repr(str(file))
    if not file.is_file():
        raise ValueError(
            f"{str(folder)!r} is a folder without {METADATA_FILE}: not a distributed checkpoint (or an incomplete one)."
        )
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load() if weights_only else pickle.load(stream)
    except _Refused as error:
        raise ValueError(
            f"{where} refers to {error}, which a distributed checkpoint's index never holds; it was not loaded, since "
            "unpickling it could run code. If you trust the folder, pass weights_only=False (on the command line: "
            "--unsafe-load)."
        ) from error
    except (EOFError, pickle.UnpicklingError) as error:
        if isinstance(error, EOFError) or "truncated" in str(error):
            raise ValueError(f"{where} is truncated or empty: the folder is an incomplete checkpoint.") from error
        raise ValueError(f"{where} is not a readable distributed checkpoint index: {error}.") from error
    except Exception as error:
        raise ValueError(
            f"{where} is not a readable distributed checkpoint index: {type(error).__name__}: {error}."
        ) from error
    return _check(metadata, where)


class CheckedReader(FileSystemReader):
    """A ``FileSystemReader`` that gives ``torch.distributed.checkpoint.load`` metadata read by :func:`read_metadata`.

    ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with a plain ``pickle.load``; ``load`` calls it on
    every rank. This reader returns the metadata it was given instead.
    """

    def __init__(self, folder: Path, metadata: Any) -> None:
        super().__init__(str(folder))
        self._checked_metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """Return the metadata checked by :func:`read_metadata` (with this read's ``load_id``)."""
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = self._checked_metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_REFUSED_OBJECT = re.compile(r"GLOBAL \S+|unrecognized function \S+|Can only (?:build|create new object)[^\n]*")


def load_tensors(request: dict[str, Any], folder: Path, metadata: Any, *, no_dist: bool = False) -> None:
    """Fill the tensors of ``request`` from ``folder`` through :class:`CheckedReader`.

    ``torch.distributed.checkpoint.load`` reports any failure as a ``CheckpointException``, a ``BaseException``
    whose text is a traceback per rank; this raises a ``ValueError`` that names the first rank's problem instead.

    Raises:
        ValueError: if a tensor file is missing, damaged, or holds an object (torch reads tensor files with
            ``weights_only=True``, whatever the caller asked).
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load

    try:
        with warnings.catch_warnings():
            # reading in one process is the point of no_dist; torch warns that it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            load(request, storage_reader=CheckedReader(folder, metadata), no_dist=no_dist)
    except CheckpointException as failure:
        causes = [cause[0] if isinstance(cause, tuple) else cause for cause in failure.failures.values()]
        cause = causes[0] if causes else failure
        text = str(cause)
        refused = _REFUSED_OBJECT.search(text) if "Weights only load failed" in text else None
        if refused:
            reason = f"a tensor file holds an object that torch refuses for safety ({refused.group(0)})"
        else:
            reason = " ".join(text.split()) or type(cause).__name__
        raise ValueError(
            f"The tensors of the distributed checkpoint {str(folder)!r} cannot be read: {reason}."
        ) from cause
