"""Storage of an EMA: its tensors in (device, dtype) groups, each updated and checked by one kernel call.

Pure torch. :class:`Storage` is built once when an EMA binds to a module; the update path only walks its lists.
A group holds tensors that one multi-tensor (``torch._foreach_*``) kernel can treat together: same devices, same
dtypes, same treatment (averaged or copied; buffer or parameter; sharded or not). With several decays, or weights
of another dtype than their EMA, groups are also cut into cache-sized blocks (:mod:`lightning_ema._blocks`) so
that each weight is read from memory once for every EMA.

An update takes one of three paths, fixed when the storage is built (:attr:`Storage.path`):

- ``"host"`` (weights and EMA on the CPU): the non-finite check reads each weight once and the host decides before
  anything is written (:mod:`lightning_ema._screen`), so a refused update leaves the EMA bit for bit as it was.
- ``"device"`` (EMA on an accelerator): the check and the skip decision stay on the device (a flag that the update
  kernels read there); the host learns the outcome later, from a non-blocking copy (:mod:`lightning_ema._device`).
- ``"deferred"`` (EMA offloaded to the CPU, weights on an accelerator): the weights are copied without blocking
  into pinned staging buffers, and the host checks and applies the update when it next needs the EMA.

Swaps, and the reads that must find each tensor wherever a swap put it, are :mod:`lightning_ema._swaps`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_ema import functional as F
from lightning_ema._blocks import Block, blocks
from lightning_ema._device import DeviceCheck, SideStream, host_buffers
from lightning_ema._screen import HostScreen
from lightning_ema._selection import AVERAGE, KEEP, TRUNCATE, Selected

__all__ = ["DEFERRED", "DEVICE", "HOST", "DeviceCheck", "Storage", "forced_path"]

HOST, DEVICE, DEFERRED = "host", "device", "deferred"
_PATHS = (HOST, DEVICE, DEFERRED)

#: Tests only: take this path whatever the devices (see :func:`forced_path`).
_FORCED_PATH: str | None = None


@contextmanager
def forced_path(path: str | None) -> Iterator[None]:
    """Build every storage inside the block with update path ``path`` (tests: the accelerator paths on CPU tensors).

    ``"device"`` runs the on-device check and the flag-gated kernels on CPU or meta tensors; ``"deferred"`` stages
    CPU weights and applies each update when the EMA is next needed, as an offloaded EMA of CUDA weights does.
    """
    global _FORCED_PATH
    if path is not None and path not in _PATHS:
        raise ValueError(f"`path` must be one of {_PATHS} or None, got {path!r}.")
    previous, _FORCED_PATH = _FORCED_PATH, path
    try:
        yield
    finally:
        _FORCED_PATH = previous


@torch.no_grad()
def _truncated_average_(emas: list[Tensor], weights: list[Tensor], weight: float, skip: Tensor | None) -> None:
    """Average integer tensors in float32 as ``(1 - weight) * ema + weight * w`` and truncate toward zero.

    The arithmetic of timm's ``ModelEma`` (float32 products of the integers, cast back by ``copy_``), so that an
    integer EMA such as ``num_batches_tracked`` takes the same values; integer buffers are few and small. With the
    on-device flag ``skip``, nothing is written when it is set.
    """
    for ema, w in zip(emas, weights, strict=True):
        averaged = ema.to(torch.float32) * (1.0 - weight) + weight * w.to(torch.float32)
        if skip is not None:
            averaged = torch.where(skip.bool(), ema.to(torch.float32), averaged)
        ema.copy_(averaged)


@dataclass
class _Group:
    """Tensors that one multi-tensor kernel can update: same devices, same dtypes, same treatment."""

    kind: str
    buffer: bool
    live: list[Tensor]
    emas: list[list[Tensor]]  # one list per decay, paired with `live` by position
    names: list[str]
    exchangeable: bool
    checked: list[int] = field(default_factory=list)  # positions of the floating, non-empty tensors
    checked_names: list[str] = field(default_factory=list)
    limit: float = math.inf  # the largest weight magnitude the EMA's dtype holds (see `F.range_limit`)
    blocks: list[Block] = field(default_factory=list)
    staging: list[Tensor] | None = None
    screen: HostScreen | None = field(default=None, repr=False)  # the host and deferred paths' check
    # The tensors of a bound `target` module, which are the EMA; a swap leaves stand-ins in `emas[0]`.
    target: list[Tensor] | None = field(default=None, repr=False)

    @property
    def sources(self) -> list[Tensor]:
        """What the update reads: the staged copies of the weights, or the weights themselves."""
        return self.live if self.staging is None else self.staging


class Storage:
    """The EMA tensors of one bound module, grouped so that each operation is one kernel call per group.

    Args:
        selected: the tracked tensors (see :func:`lightning_ema._selection.select`).
        sources: initial values, one mapping by name per EMA (``None``: the current weights).
        targets: with a target module, its tensors by name: they are the EMA (nothing is allocated).
        num_emas: how many EMAs (decays) are kept.
        device: where the EMA lives (``None``: with each weight).
        dtype: the EMA's dtype (``None``: see :func:`lightning_ema.functional.ema_dtype_for`).
        side_stream: on CUDA, issue updates on a side stream (see :meth:`set_side_stream`).
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
        side_stream: bool = False,
    ) -> None:
        self.num_emas = num_emas
        by_key: dict[tuple[Any, ...], _Group] = {}
        index_of: dict[tuple[Any, ...], int] = {}
        where: dict[str, tuple[int, int]] = {}
        for item in selected:
            live = item.live
            ema_dtype = F.ema_dtype_for(live.dtype, dtype) if item.kind == AVERAGE else live.dtype
            emas = [
                _allocate(item, live, sources, targets, k, device or live.device, ema_dtype) for k in range(num_emas)
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
        #: Where each ``state_dict`` name is: (group, position in the group).
        self.where = where
        self.path = _FORCED_PATH or _path_for(self.groups)
        # Buffers made under `torch.inference_mode` (validate before fit) would refuse in-place updates later.
        with torch.inference_mode(False):
            for group in self.groups:
                self._prepare(group, targets is not None)
        self._staged: list[Any] = []
        self._readback: tuple[Tensor, Tensor] | None = None
        #: Where updates are issued (``side.issuing()``) and what reads of the EMA wait for (``side.wait()``).
        self.side = SideStream()
        self.set_side_stream(side_stream)

    def _prepare(self, group: _Group, targeted: bool) -> None:
        if targeted:
            group.target = list(group.emas[0])
        # Every floating tensor entering the EMA is checked; empty ones cannot hold a NaN.
        group.checked = [i for i, t in enumerate(group.live) if t.is_floating_point() and t.numel()]
        group.checked_names = [group.names[i] for i in group.checked]
        if group.checked:
            group.limit = F.range_limit(group.live[0].dtype, group.emas[0][0].dtype)
        home = group.emas[0][0].device if group.live else None
        if group.live and (self.path == DEFERRED or group.live[0].device != home):
            pinned = home is not None and home.type == "cpu" and group.live[0].device.type == "cuda"
            group.staging = [torch.empty(w.shape, dtype=w.dtype, device=home, pin_memory=pinned) for w in group.live]
        widen = bool(group.live) and group.live[0].dtype != group.emas[0][0].dtype
        if group.kind == AVERAGE and (self.num_emas > 1 or widen):
            group.blocks = blocks(group.sources, group.emas, widen)
        if group.checked and self.path != DEVICE:
            group.screen = HostScreen(group.sources, group.checked, group.limit)

    # ------------------------------------------------------------------ update (all paths)
    def copy_weights(self, skip: Tensor | None = None, *, keep_kept: bool = False) -> None:
        """Set every EMA to the current weights (unless the on-device flag ``skip`` is set).

        ``keep_kept``: except the integer buffers kept by policy.
        """
        for group in self.groups:
            if keep_kept and group.kind == KEEP:
                continue
            for ema in group.emas:
                if skip is None:
                    F.copy_(ema, group.sources)
                else:
                    F.gated_copy_(ema, group.sources, _on(skip, ema))

    def average(
        self, weights: Sequence[float], buffer_weights: Sequence[float] | None = None, skip: Tensor | None = None
    ) -> None:
        """Move EMA ``k`` towards the weights by ``weights[k]`` (``1 - decay``); copied tensors are copied.

        ``buffer_weights`` replaces ``weights`` for buffers, if given. Integer buffers kept (``KEEP``) are left.
        ``skip``: a float32 0-d flag on the device (``"device"`` path); when it is ``1`` nothing is written.
        """
        for group in self.groups:
            if group.kind == KEEP:
                continue
            group_weights = buffer_weights if group.buffer and buffer_weights is not None else weights
            sources = group.sources
            if group.kind != AVERAGE:
                for ema, weight in zip(group.emas, group_weights, strict=True):
                    if group.kind == TRUNCATE:
                        _truncated_average_(ema, sources, weight, None if skip is None else _on(skip, ema))
                    elif skip is None:
                        F.copy_(ema, sources)
                    else:
                        F.gated_copy_(ema, sources, _on(skip, ema))
                continue
            parts = [(block.emas, block.weights(sources)) for block in group.blocks] or [(group.emas, sources)]
            for emas, block_weights in parts:
                for ema, weight in zip(emas, group_weights, strict=True):
                    if skip is None:
                        F.lerp_(ema, block_weights, weight)
                    else:
                        F.gated_lerp_(ema, block_weights, weight, _on(skip, ema))

    # ------------------------------------------------------------------ "host" and "deferred" paths
    @torch.no_grad()
    def nonfinite(self) -> tuple[bool, list[str]]:
        """Return whether any checked weight holds NaN or infinity, and the names of those that do.

        One read of every checked weight, allocating nothing (:class:`~lightning_ema._screen.HostScreen`), and one
        host read per group. Only a non-finite screen (a NaN or inf, or finite values whose sum overflows) leads
        to the exact check of its tensors, which names them. A weight beyond the range of a narrower EMA dtype
        (:attr:`narrowing`) counts as non-finite: the EMA would turn it into an infinity.
        """
        bad = []
        for group in self.groups:
            if group.screen is not None:
                suspicious = group.screen.suspicious(group.sources)
                finite = F.finite_each([group.sources[i] for i in suspicious], limit=group.limit)
                bad += [group.names[i] for i, ok in zip(suspicious, finite, strict=True) if not ok]
        return bool(bad), bad

    @property
    def narrowing(self) -> bool:
        """Whether some EMA is kept in a dtype of smaller range than its weights (see :meth:`nonfinite`)."""
        return any(not math.isinf(group.limit) for group in self.groups)

    @torch.no_grad()
    def stage(self) -> None:
        """Copy the weights into the staging buffers of the groups that have them, without waiting for the copies.

        An update on the device reads them in stream order; the host must call :meth:`wait_staged` first.
        """
        devices = set()
        for group in self.groups:
            if group.staging is not None:
                F.copy_(group.staging, group.live, non_blocking=True)
                devices.add(group.live[0].device)
        self._staged = [_record(device) for device in devices if device.type not in ("cpu", "meta")]

    def wait_staged(self) -> None:
        """Wait until the copies of :meth:`stage` have landed (normally long done by then)."""
        for event in self._staged:
            event.synchronize()
        self._staged = []

    # ------------------------------------------------------------------ "device" path
    @torch.no_grad()
    def device_check(self) -> DeviceCheck | None:
        """Check every checked weight for NaN and infinity on its device, without the host reading anything."""
        checked = [group for group in self.groups if group.checked]
        if not checked:
            return None
        masks = [F.nonfinite_mask([group.sources[i] for i in group.checked], limit=group.limit) for group in checked]
        home = masks[0].device
        flags = torch.cat([mask.to(home, non_blocking=True) for mask in masks])
        names = [name for group in checked for name in group.checked_names]
        if flags.device.type not in ("cpu", "meta") and self._readback is None:
            # One outcome is in flight at a time (it is read before the next update is issued): reuse the buffers.
            self._readback = host_buffers(flags)
        return DeviceCheck(flags, flags.any().float(), names, self._readback)

    def set_side_stream(self, enabled: bool) -> None:
        """Issue updates on a side stream (CUDA, ``"device"`` path, EMA on one device), or stop doing so.

        The updates' kernels are issued inside ``side.issuing()``; reads of the EMA call ``side.wait()`` first.
        """
        self.side.close()
        devices = {group.emas[0][0].device for group in self.groups if group.emas[0]}
        if not enabled or self.path != DEVICE or len(devices) != 1 or next(iter(devices)).type != "cuda":
            self.side = SideStream()  # a side stream per device is not worth its complexity: stream order
        else:
            self.side = SideStream(next(iter(devices)))

    # ------------------------------------------------------------------ other reads
    def first_device(self) -> torch.device:
        """The device of the first checked weight (where a flag for a collective lives)."""
        for group in self.groups:
            if group.checked:
                return group.live[group.checked[0]].device
        return self.groups[0].live[0].device


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
    """EMA ``k`` of ``item``, on ``device`` in ``dtype``: from ``sources`` if given, else the weight's value."""
    initial = sources[k][item.names[0]] if sources is not None else live.detach()
    if targets is not None:
        ema = targets[item.names[0]]
        if sources is None:
            return ema  # the target's values are the EMA
    else:
        # Never an inference tensor: an EMA first made under `torch.inference_mode` (validate before fit)
        # must still be updatable in place and usable by autograd afterwards. An offloaded EMA of CUDA
        # weights is pinned, so that copies between it and the weights need not block.
        pinned = device.type == "cpu" and live.device.type == "cuda"
        with torch.inference_mode(False):
            ema = torch.empty(live.shape, dtype=dtype, device=device, pin_memory=pinned)
    # `inference_mode(False)` turns grad mode back on: keep `no_grad`, or a target's parameters refuse the copy.
    with torch.inference_mode(False), torch.no_grad():
        ema.copy_(initial)
    return ema


def _on(flag: Tensor, tensors: list[Tensor]) -> Tensor:
    """The on-device flag ``flag`` on the device of ``tensors`` (copied without blocking if it is elsewhere)."""
    device = tensors[0].device if tensors else flag.device
    return flag if flag.device == device else flag.to(device, non_blocking=True)


def _record(device: torch.device) -> Any:
    """An event recorded now on ``device``'s current stream."""
    event = torch.Event(device=device)
    event.record()
    return event


def _path_for(groups: list[_Group]) -> str:
    """The update path for these groups' devices.

    ``"host"`` when everything is on the CPU, ``"device"`` when every EMA is on an accelerator, ``"deferred"`` when
    the EMA is on the CPU and some weights are not; EMAs on both the CPU and accelerators need the host.
    """
    ema_on_cpu = {group.emas[0][0].device.type == "cpu" for group in groups if group.live}
    live_on_cpu = {group.live[0].device.type == "cpu" for group in groups if group.live}
    if ema_on_cpu == {True}:
        return HOST if live_on_cpu == {True} else DEFERRED
    return DEVICE if ema_on_cpu == {False} else HOST
