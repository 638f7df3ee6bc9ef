"""Storage of an EMA: its tensors in (device, dtype) groups, each updated, checked and swapped by one kernel call.

Pure torch. :class:`Storage` is built once when an EMA binds to a module; the update path only walks its lists.
A group holds tensors that one multi-tensor (``torch._foreach_*``) kernel can treat together: same devices, same
dtypes, same treatment (averaged or copied; buffer or parameter; sharded or not). With several decays, groups
are also cut into cache-sized blocks so that each weight is read from memory once for all EMAs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_ema import functional as F
from lightning_ema._selection import AVERAGE, KEEP, TRUNCATE, Selected

__all__ = ["BLOCK_BYTES", "Storage"]

#: Bytes of weights per block when several decays share a pass: well inside a core's L2 + L3 share, so the
#: weights are read from memory once and from cache by the other EMAs' kernels.
BLOCK_BYTES = 4 * 2**20

_Piece = tuple[int, int | None, int | None]


@dataclass
class _Block:
    """A slice of a group small enough to stay in cache while every EMA of it is updated.

    ``pieces`` are (position in the group, start, stop): a whole tensor (``start`` is ``None``) or a flat chunk
    of a large one. The weights' views are made at each update from the group's live tensor objects, so they
    follow a re-pointed ``.data``; the EMA views are made once (the EMA's storage outlives every swap).
    """

    pieces: list[_Piece]
    emas: list[list[Tensor]]

    def weights(self, live: list[Tensor]) -> list[Tensor]:
        return [live[p] if start is None else live[p].detach().view(-1)[start:stop] for p, start, stop in self.pieces]


@dataclass
class _Group:
    """Tensors that one multi-tensor kernel can update: same devices, same dtypes, same treatment."""

    kind: str
    buffer: bool
    live: list[Tensor]
    emas: list[list[Tensor]]  # one list per decay, paired with `live` by position
    names: list[str]
    exchangeable: bool
    checked: list[Tensor] = field(default_factory=list)
    checked_names: list[str] = field(default_factory=list)
    blocks: list[_Block] = field(default_factory=list)
    staging: list[Tensor] | None = None
    backup: list[Tensor] | None = field(default=None, repr=False)
    # The tensors of a bound `target` module, which are the EMA; a swap leaves stand-ins in `emas[0]`.
    target: list[Tensor] | None = field(default=None, repr=False)


def _piece(tensors: list[Tensor], piece: _Piece) -> Tensor:
    position, start, stop = piece
    return tensors[position] if start is None else tensors[position].view(-1)[start:stop]


def _blocks(live: list[Tensor], emas: list[list[Tensor]], block_bytes: int) -> list[_Block]:
    pieces: list[_Piece] = []
    size = 0
    blocks = []

    def close() -> None:
        nonlocal pieces, size
        if pieces:
            blocks.append(_Block(pieces, [[_piece(ema, piece) for piece in pieces] for ema in emas]))
        pieces, size = [], 0

    for position, tensor in enumerate(live):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > block_bytes and tensor.is_contiguous():
            close()
            step = max(1, block_bytes // tensor.element_size())
            for start in range(0, tensor.numel(), step):
                pieces.append((position, start, min(start + step, tensor.numel())))
                close()
            continue
        pieces.append((position, None, None))
        size += nbytes
        if size >= block_bytes:
            close()
    close()
    return blocks


def _truncated_average_(emas: list[Tensor], weights: list[Tensor], weight: float) -> None:
    """Average integer tensors in float32 as ``(1 - weight) * ema + weight * w`` and truncate toward zero.

    The arithmetic of timm's ``ModelEma`` (float32 products of the integers, cast back by ``copy_``), so that an
    integer EMA such as ``num_batches_tracked`` takes the same values; integer buffers are few and small.
    """
    for ema, w in zip(emas, weights, strict=True):
        ema.copy_(ema.to(torch.float32) * (1.0 - weight) + weight * w.to(torch.float32))


class Storage:
    """The EMA tensors of one bound module, grouped so that each operation is one kernel call per group.

    Args:
        selected: the tracked tensors (see :func:`lightning_ema._selection.select`).
        sources: initial values, one mapping by name per EMA (``None``: the current weights).
        targets: with a target module, its tensors by name: they are the EMA (nothing is allocated).
        num_emas: how many EMAs (decays) are kept.
        device: where the EMA lives (``None``: with each weight).
        dtype: the EMA's dtype (``None``: see :func:`lightning_ema.functional.ema_dtype_for`).
    """

    def __init__(
        self,
        selected: Sequence[Selected],
        sources: Sequence[Mapping[str, Tensor]] | None,
        targets: Mapping[str, Tensor] | None,
        *,
        num_emas: int,
        device: torch.device | None,
        dtype: torch.dtype | None,
    ) -> None:
        self.num_emas = num_emas
        by_key: dict[tuple[Any, ...], _Group] = {}
        index_of: dict[tuple[Any, ...], int] = {}
        where: dict[str, tuple[int, int]] = {}
        for item in selected:
            live = item.live
            ema_dtype = F.ema_dtype_for(live.dtype, dtype) if item.kind == AVERAGE else live.dtype
            emas = [
                self._allocate(item, live, sources, targets, k, device or live.device, ema_dtype)
                for k in range(num_emas)
            ]
            sharded = item.sharding is not None
            key = (item.kind, item.buffer, sharded, live.device, live.dtype, emas[0].device, emas[0].dtype)
            group = by_key.get(key)
            if group is None:
                # FSDP2 all-gathers from its own storage: a sharded EMA must be copied in, not exchanged.
                exchangeable = not sharded and live.device == emas[0].device and live.dtype == emas[0].dtype
                group = by_key[key] = _Group(
                    item.kind, item.buffer, [], [[] for _ in range(num_emas)], [], exchangeable
                )
                index_of[key] = len(index_of)
            position = len(group.live)
            group.live.append(live)
            for k, ema in enumerate(emas):
                group.emas[k].append(ema)
            group.names.append(item.names[0])
            for name in item.names:
                where[name] = (index_of[key], position)
        self.groups = list(by_key.values())
        self.where = where
        self.swap_depth = 0
        self.swap_index = 0
        for group in self.groups:
            if targets is not None:
                group.target = list(group.emas[0])
            # Every floating tensor entering the EMA is checked; empty ones have no maximum to take.
            floating = [(t, n) for t, n in zip(group.live, group.names, strict=True) if t.is_floating_point()]
            group.checked = [t for t, _ in floating if t.numel()]
            group.checked_names = [n for t, n in floating if t.numel()]
            if group.live and group.live[0].device != group.emas[0][0].device:
                group.staging = [
                    torch.empty_like(e, dtype=w.dtype) for e, w in zip(group.emas[0], group.live, strict=True)
                ]
            elif num_emas > 1 and group.kind == AVERAGE:
                group.blocks = _blocks(group.live, group.emas, BLOCK_BYTES)

    @staticmethod
    @torch.no_grad()
    def _allocate(
        item: Selected,
        live: Tensor,
        sources: Sequence[Mapping[str, Tensor]] | None,
        targets: Mapping[str, Tensor] | None,
        k: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        initial = sources[k][item.names[0]] if sources is not None else live.detach()
        if targets is not None:
            ema = targets[item.names[0]]
            if sources is None:
                return ema  # the target's values are the EMA
        else:
            # Never an inference tensor: an EMA first made under `torch.inference_mode` (validate before fit)
            # must still be updatable in place and usable by autograd afterwards.
            with torch.inference_mode(False):
                ema = torch.empty(live.shape, dtype=dtype, device=device)
        # `inference_mode(False)` turns grad mode back on: keep `no_grad`, or a target's parameters refuse the copy.
        with torch.inference_mode(False), torch.no_grad():
            ema.copy_(initial)
        return ema

    # ------------------------------------------------------------------ update
    def copy_weights(self, *, keep_kept: bool = False) -> None:
        """Set every EMA to the current weights (``keep_kept``: except the integer buffers kept by policy)."""
        for group in self.groups:
            if keep_kept and group.kind == KEEP:
                continue
            for ema in group.emas:
                F.copy_(ema, group.live)

    def average(self, weights: Sequence[float], buffer_weights: Sequence[float] | None = None) -> None:
        """Move EMA ``k`` towards the weights by ``weights[k]`` (``1 - decay``); copied tensors are copied.

        ``buffer_weights`` replaces ``weights`` for buffers, if given. Integer buffers kept (``KEEP``) are left.
        """
        for group in self.groups:
            if group.kind == KEEP:
                continue
            group_weights = buffer_weights if group.buffer and buffer_weights is not None else weights
            live = group.live
            if group.blocks:
                for block in group.blocks:
                    block_weights = block.weights(live)
                    for block_ema, weight in zip(block.emas, group_weights, strict=True):
                        F.lerp_(block_ema, block_weights, weight)
                continue
            if group.staging is not None:
                F.copy_(group.staging, live)
                live = group.staging
            for ema, weight in zip(group.emas, group_weights, strict=True):
                if group.kind == AVERAGE:
                    F.lerp_(ema, live, weight)
                elif group.kind == TRUNCATE:
                    _truncated_average_(ema, live, weight)
                else:
                    F.copy_(ema, live)

    def nonfinite(self) -> tuple[bool, list[str]]:
        """Return whether any checked weight holds NaN or infinity, and the names of those that do."""
        checked = [group for group in self.groups if group.checked]
        flags = [F.nonfinite_mask(group.checked) for group in checked]
        if not any(bool(flag.any()) for flag in flags):
            return False, []
        bad = [
            name
            for group, flag in zip(checked, flags, strict=True)
            for name, is_bad in zip(group.checked_names, flag.tolist(), strict=True)
            if is_bad
        ]
        return True, bad

    def first_device(self) -> torch.device:
        """The device of the first checked weight (where a flag for a collective lives)."""
        for group in self.groups:
            if group.checked:
                return group.checked[0].device
        return self.groups[0].live[0].device

    def relative_distances(self) -> list[Tensor]:
        """Return ``||ema - w|| / ||w||`` over the averaged tensors, one 0-d tensor per EMA, without a host sync."""
        groups = [group for group in self.groups if group.kind == AVERAGE and group.checked]
        if not groups:
            return []
        home = groups[0].emas[0][0].device
        weight_norms = [F.squared_norm(group.live).to(home) for group in groups]
        denominator = torch.stack(weight_norms).sum().clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        distances = []
        for k in range(self.num_emas):
            squared = [F.squared_distance(group.emas[k], group.live).to(home) for group in groups]
            distances.append(torch.stack(squared).sum().sqrt() / denominator)
        return distances

    # ------------------------------------------------------------------ swaps
    def swap_in(self, index: int) -> None:
        """Put EMA ``index`` into the module: exchange storage where device and dtype agree, else back up and copy."""
        copied = [group for group in self.groups if not group.exchangeable]
        # Allocate every backup before touching the module, so a failure here changes nothing.
        backups = [
            [w.detach().to(e.device, copy=True) for w, e in zip(g.live, g.emas[index], strict=True)] for g in copied
        ]
        for group, backup in zip(copied, backups, strict=True):
            group.backup = backup
            F.copy_(group.live, group.emas[index])
        for group in self.groups:
            if group.exchangeable:
                F.exchange_(group.live, group.emas[index])
        self.swap_index = index

    def swap_out(self) -> None:
        """Restore the raw weights bit-exactly."""
        for group in self.groups:
            if group.exchangeable:
                F.exchange_(group.live, group.emas[self.swap_index])
                if group.target is not None:
                    group.emas[0][:] = group.target  # the target's own tensors again, not views of its storage
            elif group.backup is not None:
                F.copy_(group.live, group.backup)
                group.backup = None

    def copy_into_module(self, index: int) -> None:
        """Overwrite the module's tracked tensors with EMA ``index``."""
        for group in self.groups:
            F.copy_(group.live, group.emas[index])

    # ------------------------------------------------------------------ views by name
    def ema_by_name(self, index: int) -> dict[str, Tensor]:
        """EMA ``index`` by ``state_dict`` name, wherever a swap has put it (live tensors)."""
        exchanged = self.swap_depth > 0 and index == self.swap_index
        result = {}
        for name, (g, i) in self.where.items():
            group = self.groups[g]
            tensor = group.live[i] if exchanged and group.exchangeable else group.emas[index][i]
            result[name] = tensor.detach()
        return result

    def raw_by_name(self) -> dict[str, Tensor]:
        """The raw values of the tracked tensors by name, wherever a swap has put them."""
        result = {}
        for name, (g, i) in self.where.items():
            group = self.groups[g]
            if self.swap_depth and group.exchangeable:
                tensor = group.emas[self.swap_index][i]
            elif self.swap_depth and group.backup is not None:
                tensor = group.backup[i]
            else:
                tensor = group.live[i]
            result[name] = tensor.detach()
        return result

    def buffer_emas(self) -> list[Tensor]:
        """The EMA tensors of the tracked buffers, wherever a swap has put them (for in-place syncing)."""
        result = []
        for group in (group for group in self.groups if group.buffer):
            for k, emas in enumerate(group.emas):
                exchanged = self.swap_depth > 0 and k == self.swap_index and group.exchangeable
                result.extend(group.live if exchanged else emas)
        return result
