"""Handing an EMA back from a spawned ``fit`` worker to the main process (``ddp_spawn``, ``ddp_fork``, notebooks).

Spawn and fork launchers run ``fit`` in copies of the callback; only the module's weights come back. So rank 0 of
the workers leaves the EMA state in a file whose path the callback fixed when it was made (in the main process),
and the main process picks it up the next time it needs the EMA. The state binds to a module only if that module
holds the raw weights ``fit`` ended with (a float64 sum per tensor), never to another one.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SpawnHandover"]


class SpawnHandover:
    """The file through which a spawned worker hands its EMA state to the process that made the callback."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.path = Path(tempfile.gettempdir()) / f"lightning_ema-{self.owner_pid}-{uuid.uuid4().hex}.pt"
        #: A state taken from the file and not yet bound to a module: ``{"state": ..., "digest": ...}``.
        self.payload: dict[str, Any] | None = None
        weakref.finalize(self, _remove_if_owner, self.path, self.owner_pid)

    @property
    def state(self) -> dict[str, Any] | None:
        """The handed-over EMA state (``None`` if there is none)."""
        return None if self.payload is None else self.payload["state"]

    def take(self) -> bool:
        """Read a state a worker left; return whether one was taken (the owner process also removes the file)."""
        if not self.path.is_file():
            return False
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a half-written or foreign file is not a hand-over: leave it alone
            return False
        if os.getpid() == self.owner_pid:
            self.path.unlink(missing_ok=True)
        self.payload = payload
        return True

    def write(self, state: dict[str, Any], raw: dict[str, Tensor]) -> None:
        """In a worker: leave ``state`` for the main process, with a digest of the raw weights it belongs to."""
        if os.getpid() == self.owner_pid:
            return  # not a spawned or forked worker: the EMA is already where the caller is
        partial_path = self.path.with_suffix(".part")
        torch.save({"state": state, "digest": _digest(raw)}, partial_path)
        os.replace(partial_path, self.path)

    def belongs_to(self, module: nn.Module) -> bool:
        """Whether ``module`` holds the raw weights the handed-over EMA's ``fit`` ended with."""
        if self.payload is None:
            return False
        digest = self.payload["digest"]
        live = module.state_dict()
        if not set(digest) <= set(live):
            return False
        now = _digest({name: live[name] for name in digest})
        return now.keys() == digest.keys() and all(
            math.isclose(now[name], value, rel_tol=1e-9, abs_tol=1e-12) for name, value in digest.items()
        )


def _digest(tensors: dict[str, Tensor]) -> dict[str, float]:
    """A float64 sum per floating-point tensor: enough to recognise the weights a spawned ``fit`` ended with."""
    return {name: float(t.detach().double().sum()) for name, t in tensors.items() if t.is_floating_point()}


def _remove_if_owner(path: Path, owner_pid: int) -> None:
    """Delete a hand-over file nobody read, from the process that made the callback only."""
    if os.getpid() == owner_pid:
        path.unlink(missing_ok=True)
        path.with_suffix(".part").unlink(missing_ok=True)
