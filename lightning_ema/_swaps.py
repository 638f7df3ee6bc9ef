"""Swaps of an EMA into its module and back, and reads by name that find each tensor wherever a swap put it.

Pure torch. Groups whose EMA shares device and dtype with the weights exchange storage (no copy, no memory); the
others back the raw weights up and copy the EMA in. Swapping out restores the raw weights bit for bit. The reads
(:meth:`Swaps.ema_by_name`, :meth:`Swaps.raw_by_name`) return live tensors, not copies; so do the distances
between the EMA and the raw weights (:meth:`Swaps.relative_distances`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_ema import functional as F
from lightning_ema import sharding as S
from lightning_ema._groups import Storage
from lightning_ema._selection import AVERAGE
from lightning_ema.errors import EMAStateError

__all__ = ["Swaps", "copy_by_name"]


class Swaps:
    """Which EMA of a storage is in the module in place of the raw weights, and how deeply swaps are nested.

    Args:
        storage: the EMA tensors.
        module: the module holding the weights.
        sharded: whether some weights are DTensors: the module is resharded before every swap (FSDP2).
    """

    def __init__(self, storage: Storage, module: nn.Module, *, sharded: bool) -> None:
        self.storage = storage
        self.module = module
        self.sharded = sharded
        #: How many swaps are open (``0``: the raw weights are in the module), and which EMA they put in.
        self.depth = 0
        self.index = 0
        # The raw weights of the groups that copy the EMA in, one list per group while swapped (else None).
        self._backups: list[list[Tensor] | None] = [None] * len(storage.groups)

    def swap_in(self, index: int) -> None:
        """Put EMA ``index`` into the module, or count one level deeper if it is in already.

        Raises:
            RuntimeError: if another EMA is swapped in.
        """
        if self.depth and index != self.index:
            raise RuntimeError(f"EMA {self.index} is swapped in; swap it out before swapping in EMA {index}.")
        if self.depth == 0:
            if self.sharded:
                S.reshard_all(self.module)
            self._put_in(index)
        self.depth += 1

    def swap_out(self, *, force: bool = False) -> None:
        """Close one swap (``force``: all of them); the last one restores the raw weights bit for bit."""
        if self.depth == 0:
            return
        self.depth = 0 if force else self.depth - 1
        if self.depth:
            return
        if self.sharded:
            # Validation leaves the FSDP2 root unsharded with the EMA in it; reshard before restoring the shards.
            S.reshard_all(self.module)
        self._take_out()

    def _put_in(self, index: int) -> None:
        groups = self.storage.groups
        copied = [k for k, group in enumerate(groups) if not group.exchangeable]
        # Allocate every backup before touching the module, so a failure here changes nothing.
        backups = [
            [w.detach().to(e.device, copy=True) for w, e in zip(groups[k].live, groups[k].emas[index], strict=True)]
            for k in copied
        ]
        for k, backup in zip(copied, backups, strict=True):
            self._backups[k] = backup
            F.copy_(groups[k].live, groups[k].emas[index])
        for group in groups:
            if group.exchangeable:
                F.exchange_(group.live, group.emas[index])
        self.index = index

    def _take_out(self) -> None:
        for k, group in enumerate(self.storage.groups):
            backup = self._backups[k]
            if group.exchangeable:
                F.exchange_(group.live, group.emas[self.index])
                if group.target is not None:
                    group.emas[0][:] = group.target  # the target's own tensors again, not views of its storage
            elif backup is not None:
                F.copy_(group.live, backup)
                self._backups[k] = None

    def copy_into_module(self, index: int) -> None:
        """Overwrite the module's tracked tensors with EMA ``index`` (not while swapped: the raw weights are lost)."""
        for group in self.storage.groups:
            F.copy_(group.live, group.emas[index])

    # ------------------------------------------------------------------ reads wherever a swap put the tensors
    def _ema_of(self, g: int, index: int) -> list[Tensor]:
        """The tensors holding EMA ``index`` of group ``g``: in the module if a swap exchanged them in."""
        group = self.storage.groups[g]
        exchanged = self.depth > 0 and index == self.index and group.exchangeable
        return group.live if exchanged else group.emas[index]

    def _raw_of(self, g: int) -> list[Tensor]:
        """The tensors holding the raw weights of group ``g``: out of the module while swapped."""
        group, backup = self.storage.groups[g], self._backups[g]
        if self.depth and group.exchangeable:
            return group.emas[self.index]
        return backup if self.depth and backup is not None else group.live

    def ema_by_name(self, index: int) -> dict[str, Tensor]:
        """EMA ``index`` by ``state_dict`` name, wherever a swap has put it (live tensors)."""
        return {name: self._ema_of(g, index)[i].detach() for name, (g, i) in self.storage.where.items()}

    def raw_by_name(self) -> dict[str, Tensor]:
        """The raw values of the tracked tensors by name, wherever a swap has put them."""
        return {name: self._raw_of(g)[i].detach() for name, (g, i) in self.storage.where.items()}

    def relative_distances(self) -> list[Tensor]:
        """Return ``||ema - w|| / ||w||`` over the averaged tensors, one 0-d tensor per EMA, without a host sync.

        ``w`` are the raw weights wherever a swap has put them (inside a swap the module holds an EMA).
        """
        groups = [g for g, group in enumerate(self.storage.groups) if group.kind == AVERAGE and group.checked]
        if not groups:
            return []
        home = self._ema_of(groups[0], 0)[0].device
        weight_norms = [F.squared_norm(self._raw_of(g)).to(home) for g in groups]
        denominator = torch.stack(weight_norms).sum().clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        distances = []
        for k in range(self.storage.num_emas):
            squared = [F.squared_distance(self._ema_of(g, k), self._raw_of(g)).to(home) for g in groups]
            distances.append(torch.stack(squared).sum().sqrt() / denominator)
        return distances

    def buffer_emas(self) -> list[Tensor]:
        """The EMA tensors of the tracked buffers, wherever a swap has put them (for in-place syncing)."""
        groups = [g for g, group in enumerate(self.storage.groups) if group.buffer]
        return [tensor for g in groups for k in range(self.storage.num_emas) for tensor in self._ema_of(g, k)]


def copy_by_name(ema: Mapping[str, Tensor], module: nn.Module) -> None:
    """Copy ``ema`` into the tensors of ``module`` with the same canonical ``state_dict`` names.

    Raises:
        EMAStateError: if ``module`` lacks a name or a shape differs; nothing is copied then.
    """
    destination = {F.canonical_name(n): t for n, t in module.state_dict(keep_vars=True).items()}
    pairs = [(destination.get(F.canonical_name(name)), tensor) for name, tensor in ema.items()]
    wrong = sorted(
        name
        for name, (tensor, value) in zip(ema, pairs, strict=True)
        if not isinstance(tensor, Tensor) or tensor.shape != value.shape
    )
    if wrong:
        raise EMAStateError(f"`module` lacks or has other shapes for {wrong}; nothing was copied.")
    with torch.no_grad():
        for tensor, value in pairs:
            tensor.copy_(value)  # type: ignore[union-attr]
