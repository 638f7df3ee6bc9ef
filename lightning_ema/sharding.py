"""What the EMA needs to know about FSDP2-sharded parameters (DTensors), in plain torch.

Under ``fully_shard`` each parameter is a DTensor whose ``to_local()`` is a view of the rank's shard, the
storage the optimizer updates in place. The EMA of such a parameter is a plain tensor the size of that local
shard: updates need no communication. Facts this module encodes:

- FSDP2 all-gathers from its own sharded storage, so an EMA is put into the module by copying into the local
  views (re-pointing ``param.data`` is silently ignored);
- after a forward without backward (validation) the root unit stays unsharded, its registered parameters
  replaced by full tensors, so every FSDP unit is resharded before the EMA binds, swaps in or swaps out;
- DTensors of unevenly sharded tensors need their global shape and stride to be rebuilt from local shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Sharding", "cut_local_shard", "is_sharded", "local_view", "reshard_all", "sharding_of", "to_dtensor"]

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch: no FSDP2 support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Sharding:
    """How a DTensor is laid out over its mesh: enough to rebuild it from the local shard."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 or tensor-parallel parameter)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def sharding_of(tensor: Tensor) -> Sharding:
    """Return the layout of a DTensor."""
    return Sharding(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))  # type: ignore[attr-defined]


def local_view(tensor: Tensor) -> Tensor:
    """Return the rank's shard of a DTensor as a plain tensor sharing its storage (a plain tensor as it is)."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()  # type: ignore[attr-defined, no-any-return]
    return tensor


def to_dtensor(local: Tensor, sharding: Sharding) -> Tensor:
    """Wrap a local shard as a DTensor with the given layout (no communication)."""
    return DTensor.from_local(
        local, sharding.mesh, sharding.placements, shape=sharding.shape, stride=sharding.stride, run_check=False
    )


def cut_local_shard(full: Tensor, sharding: Sharding) -> Tensor:
    """Return this rank's shard of a full tensor laid out like ``sharding`` (no communication)."""
    dtensor = distribute_tensor(full, sharding.mesh, list(sharding.placements), src_data_rank=None)
    return dtensor.to_local()


def reshard_all(module: nn.Module) -> None:
    """Reshard every FSDP2 unit in ``module`` so its registered parameters are the sharded DTensors again."""
    if FSDPModule is None:
        return
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()
