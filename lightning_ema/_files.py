"""Checkpoint files: reading one with an error that says what the file is, and writing an export atomically.

Users hand this package files they downloaded, copied or kept for years. When ``torch.load`` cannot read one, its
own message is often about the wrong thing (``[Errno 22] Invalid argument`` for a random file, an empty message for
an empty one, "pass weights_only=False" for a file that is not a checkpoint at all). :func:`load_file` looks at the
file first and says what it is: empty, truncated, a safetensors file, not a checkpoint, or a checkpoint that holds
an object ``torch.load`` refuses for safety, the only case where ``weights_only=False`` can help.
:func:`allowed_globals` names the one class besides tensors and plain values that checkpoints may rebuild, and a
:class:`LoadedCheckpoint` is a loaded file that remembers its path.

Exports are written by :func:`write_atomically`: into a temporary file in the destination's folder, renamed over
the destination only once complete, so that a failed write (a full disk) leaves the destination as it was.
:func:`refuse_same_file` keeps an export from overwriting the checkpoint it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import secrets
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadedCheckpoint", "allowed_globals", "load_file", "refuse_same_file", "write_atomically"]

_ZIP_MAGIC = b"PK\x03\x04"
#: What torch's legacy (non-zip) format pickles first, after the protocol bytes: its magic number, a 10-byte long.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_UNSAFE_HINT = "If you trust the file, pass weights_only=False (on the command line: --unsafe-load)."
# How torch's weights-only unpickler words the refusal of an object (as opposed to bytes it cannot parse).
_REFUSED_OBJECT = re.compile(
    r"(Unsupported global: GLOBAL \S+|GLOBAL \S+ was not an allowed global by default"
    r"|Trying to load unsupported GLOBAL \S+ whose module \S+ is blocked"
    r"|Trying to call reduce for unrecognized function \S+"
    r"|Can only (?:build|create new object)[^\n]*|\S+ must be \S+ to load)"
)
_BLOCKED_MODULE = re.compile(r"whose module (\S+) is blocked")
#: Classes that ``weights_only=True`` may rebuild here besides tensors and plain values: they hold attributes only.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


def _kind_of(head: bytes, size: int) -> str | None:
    """Guess what a file is from its first bytes: ``"zip"``, ``"pickle"``, ``"safetensors"`` or ``None``."""
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_size,) = struct.unpack("<Q", head[:8])
        if 8 + header_size <= size:
            return "safetensors"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def _explain(path: Path, kind: str | None, head: bytes, error: Exception, weights_only: bool) -> ValueError:
    """Turn ``torch.load``'s exception into one that says what the file is."""
    name = repr(str(path))
    message = str(error)
    refused = _REFUSED_OBJECT.search(message) if weights_only else None
    safety = isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in message
    if safety and refused and kind in ("zip", "pickle"):
        reason = refused.group(0)
        blocked = _BLOCKED_MODULE.search(reason)
        if blocked:
            return ValueError(
                f"`torch.load({name}, weights_only=True)` refused the file for safety: {reason}. A checkpoint never "
                f"needs the {blocked.group(1)} module; the file tries to run code. Do not load it unless you made it."
            )
        return ValueError(
            f"`torch.load({name}, weights_only=True)` refused an object in the file for safety: {reason}. "
            + _UNSAFE_HINT
        )
    damaged = "PytorchStreamReader" in message or "zip archive" in message or isinstance(error, OSError)
    if kind == "zip" and (damaged or not zipfile.is_zipfile(path)):
        return ValueError(
            f"{name} is a damaged or truncated torch archive (zip), not a readable checkpoint: {_first_line(error)}. "
            "Copy or save it again."
        )
    truncated = isinstance(error, EOFError) or any(
        word in message for word in ("unexpected EOF", "truncated", "Ran out of input")
    )
    if kind == "pickle" and truncated:
        return ValueError(f"{name} is truncated: the checkpoint ends early. Copy or save it again.")
    if kind == "pickle" and not head[2:].startswith(_LEGACY_MAGIC):
        return ValueError(
            f"{name} is a plain pickle (written by `pickle.dump`, not `torch.save`), not a checkpoint: torch.load "
            "does not read it, with or without weights_only. Save the object with `torch.save` instead."
        )
    if kind in ("zip", "pickle"):
        return ValueError(f"{name} could not be loaded: {type(error).__name__}: {_first_line(error)}.")
    return ValueError(
        f"{name} is not a checkpoint: it is neither a torch archive (zip) nor a pickle; it starts with {head[:8]!r}."
    )


def load_file(path: Path, *, weights_only: bool) -> Any:
    """``torch.load`` a checkpoint file onto the CPU; raise a ``ValueError`` that says what the file is if it fails.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is empty, truncated, damaged, a safetensors file, not a checkpoint, or holds an
            object that ``weights_only=True`` refuses (only then is ``weights_only=False`` suggested).
    """
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"{str(path)!r} is empty (0 bytes), not a checkpoint: an interrupted save or copy leaves such files."
        )
    with open(path, "rb") as stream:
        head = stream.read(16)
    kind = _kind_of(head, size)
    if kind == "safetensors":
        raise ValueError(
            f"{str(path)!r} is a safetensors file: plain weights (an export, perhaps), not a Lightning checkpoint. "
            "Read it with `safetensors.torch.load_file`."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        raise _explain(path, kind, head, error, weights_only) from error


@contextlib.contextmanager
def allowed_globals() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` rebuild ``argparse.Namespace`` (timm saves its arguments as one)."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        yield


class LoadedCheckpoint(dict[str, Any]):
    """A checkpoint already loaded from ``path`` (NeMo's layout needs the path to find its second file)."""

    def __init__(self, checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
        super().__init__(checkpoint)
        self.path = path


def refuse_same_file(checkpoint: Path, output: Path) -> None:
    """Raise if writing ``output`` would overwrite ``checkpoint``: the same path, a link to it, or a file inside it.

    Compared by resolved path (symbolic links, ``./x``, ``..``) and, where ``output`` exists, by device and inode
    (hard links).

    Raises:
        ValueError: naming both paths.
    """
    if output.is_dir():
        raise ValueError(f"`output` must be a file to write, got the folder {str(output)!r}.")
    source, target = checkpoint.resolve(), output.resolve()
    same = source == target
    if not same and output.exists() and checkpoint.exists():
        with suppress(OSError):
            same = os.path.samefile(checkpoint, output)
    if same:
        raise ValueError(
            f"`output` must not be the checkpoint being read, got {str(output)!r}, which is {str(checkpoint)!r}: "
            "writing it would destroy the checkpoint. Choose another file."
        )
    if checkpoint.is_dir() and target.is_relative_to(source):
        raise ValueError(
            f"`output` must not be inside the checkpoint folder {str(checkpoint)!r}, got {str(output)!r}: writing "
            "there could replace a part of the checkpoint. Choose a path outside it."
        )


def _temporary_next_to(destination: Path) -> Path:
    """Create an empty file in ``destination``'s folder (with the permissions a plain ``open`` would give)."""
    for _ in range(100):
        candidate = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return candidate
    raise FileExistsError(f"Could not create a temporary file next to {str(destination)!r}.")


def write_atomically(destination: Path, write: Callable[[str], None]) -> None:
    """Write ``destination`` through ``write(temporary_path)`` and rename the finished file over it.

    The temporary file lives in ``destination``'s folder (a rename within one file system is atomic), is flushed to
    disk before the rename, and is removed if anything fails, so that ``destination`` either keeps its old content
    or gets the complete new one. A symbolic link at ``destination`` keeps pointing where it did; its target is
    replaced.

    Raises:
        OSError: if writing or renaming fails; ``destination`` is left as it was.
    """
    target = destination.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_next_to(target)
    try:
        write(str(temporary))
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException as error:
        with suppress(OSError):
            temporary.unlink()
        if not isinstance(error, Exception):
            raise  # KeyboardInterrupt and the like pass as they are, after the clean-up
        what = f"Writing {str(destination)!r} failed"
        kept = "the file there, if any, was left as it was"
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, f"{what}: {error.strerror or _first_line(error)}; {kept}") from error
        raise OSError(f"{what}: {_first_line(error)}; {kept}") from error
    with suppress(OSError):  # make the rename itself durable where the platform allows it
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
