"""The few collectives an EMA needs, each a no-op in one process (plain torch.distributed)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["any_rank", "broadcast_from_rank_zero", "rank", "world_size"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (``0`` without a process group)."""
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    """The number of processes (``1`` without a process group)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (one 4-byte all-reduce; a host read of its result)."""
    if not _initialized():
        return flag
    anywhere = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
    return bool(anywhere.item())


def broadcast_from_rank_zero(tensors: list[Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors``, in place: one broadcast per (device, dtype)."""
    if not _initialized() or torch.distributed.get_world_size() < 2:
        return
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        by_kind.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in by_kind.values():
        flat = torch.cat([tensor.reshape(-1) for tensor in group])
        torch.distributed.broadcast(flat, src=0)
        chunks = torch.split(flat, [tensor.numel() for tensor in group])
        torch._foreach_copy_(group, [chunk.view_as(tensor) for chunk, tensor in zip(chunks, group, strict=True)])
