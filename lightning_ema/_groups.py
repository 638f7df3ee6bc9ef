"""Storage of an EMA: its tensors in (device, dtype) groups, each updated, checked and swapped by one kernel call.

Pure torch. :class:`Storage` is built once when an EMA binds to a module; the update path only walks its lists.
A group holds tensors that one multi-tensor (``torch._foreach_*``) kernel can treat together: same devices, same
dtypes, same treatment (averaged or copied; buffer or parameter; sharded or not). With several decays, or weights
of another dtype than their EMA, groups are also cut into cache-sized blocks so that each weight is read from
memory once for every EMA.

An update takes one of three paths, fixed when the storage is built (:attr:`Storage.path`):

- ``"host"`` (weights and EMA on the CPU): the non-finite check reads each weight once and the host decides before
  anything is written, so a refused update leaves the EMA bit for bit as it was.
- ``"device"`` (EMA on an accelerator): the check and the skip decision stay on the device (a flag that the update
  kernels read there); the host learns the outcome later, from a non-blocking copy (:class:`DeviceCheck`).
- ``"deferred"`` (EMA offloaded to the CPU, weights on an accelerator): the weights are copied without blocking
  into pinned staging buffers, and the host checks and applies the update when it next needs the EMA.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_ema import functional as F
from lightning_ema._selection import AVERAGE, KEEP, TRUNCATE, Selected

__all__ = ["BLOCK_BYTES", "DEFERRED", "DEVICE", "HOST", "DeviceCheck", "Storage", "forced_path"]

#: Bytes of weights per block when several decays share a pass (or weights are widened to the EMA's dtype), and
#: per piece of the non-finite screen: well inside a core's L2 + L3 share, so what one kernel brought into the
#: cache is still there for the next.
BLOCK_BYTES = 4 * 2**20

HOST, DEVICE, DEFERRED = "host", "device", "deferred"
_PATHS = (HOST, DEVICE, DEFERRED)

#: Tensors up to this size are screened together, concatenated into one buffer: one kernel instead of hundreds.
SMALL_BYTES = 256 * 2**10

#: Tests only: take this path whatever the devices (see :func:`forced_path`).
_FORCED_PATH: str | None = None

_Piece = tuple[int, int | None, int | None]


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


def _view(tensors: list[Tensor], piece: _Piece) -> Tensor:
    position, start, stop = piece
    return tensors[position] if start is None else tensors[position].view(-1)[start:stop]


def _cut(live: list[Tensor], positions: Sequence[int], block_bytes: int) -> list[_Piece]:
    """Pieces of the tensors at ``positions``: whole tensors, and flat chunks of large contiguous ones."""
    pieces: list[_Piece] = []
    for position in positions:
        tensor = live[position]
        size = tensor.element_size()
        if tensor.numel() * size > block_bytes and tensor.is_contiguous():
            step = max(1, block_bytes // size)
            pieces += [(position, a, min(a + step, tensor.numel())) for a in range(0, tensor.numel(), step)]
        else:
            pieces.append((position, None, None))
    return pieces


@dataclass
class _Block:
    """A slice of a group small enough to stay in cache while every EMA of it is updated.

    ``pieces`` are (position in the group, start, stop): a whole tensor (``start`` is ``None``) or a flat chunk
    of a large one. The weights' views are made at each update from the group's live tensor objects, so they
    follow a re-pointed ``.data``; the EMA views are made once (the EMA's storage outlives every swap).
    ``scratch`` (weights of another dtype than the EMA) receives the widened weights of the block.
    """

    pieces: list[_Piece]
    emas: list[list[Tensor]]
    scratch: list[Tensor] | None = None

    def weights(self, sources: list[Tensor]) -> list[Tensor]:
        """The block's weights, widened to the EMA's dtype if the group needs it."""
        views = [_view(sources, piece) for piece in self.pieces]
        if self.scratch is None:
            return views
        F.copy_(self.scratch, views)
        return self.scratch


def _blocks(live: list[Tensor], emas: list[list[Tensor]], block_bytes: int, widen: bool) -> list[_Block]:
    blocks: list[_Block] = []
    pieces: list[_Piece] = []
    size = 0

    def close() -> None:
        nonlocal pieces, size
        if pieces:
            views = [[_view(ema, piece) for piece in pieces] for ema in emas]
            scratch = [torch.empty_like(view) for view in views[0]] if widen else None
            blocks.append(_Block(pieces, views, scratch))
        pieces, size = [], 0

    for piece in _cut(live, range(len(live)), block_bytes):
        position, start, _ = piece
        if start is not None:
            close()
            pieces.append(piece)
            close()
            continue
        pieces.append(piece)
        size += live[position].numel() * live[position].element_size()
        if size >= block_bytes:
            close()
    close()
    return blocks


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
    blocks: list[_Block] = field(default_factory=list)
    staging: list[Tensor] | None = None
    # The non-finite screen of the host path: the large checked tensors one by one, the small ones concatenated
    # into `pack`; a pair of 0-d slots each in `sums` (the pack's last).
    screen: list[int] = field(default_factory=list)
    small: list[int] = field(default_factory=list)
    pack: Tensor | None = field(default=None, repr=False)
    sums: Tensor | None = field(default=None, repr=False)
    slots: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)
    backup: list[Tensor] | None = field(default=None, repr=False)
    # The tensors of a bound `target` module, which are the EMA; a swap leaves stand-ins in `emas[0]`.
    target: list[Tensor] | None = field(default=None, repr=False)

    @property
    def sources(self) -> list[Tensor]:
        """What the update reads: the staged copies of the weights, or the weights themselves."""
        return self.live if self.staging is None else self.staging


@dataclass
class DeviceCheck:
    """The outcome of an on-device non-finite check, read by the host only when it asks (:meth:`bad`).

    ``found`` is a float32 0-d tensor (``1.0``: some checked weight holds NaN or infinity) that the update kernels
    read on the device; ``flags`` says which tensor, in the order of ``names``.
    """

    flags: Tensor
    found: Tensor
    names: list[str]
    buffers: tuple[Tensor, Tensor] | None = None  # host memory to copy into (pinned on CUDA), reused
    _host: tuple[Tensor, Tensor] | None = None
    _event: Any = None

    def start_readback(self) -> None:
        """Copy the outcome to the host without waiting for it (pinned memory and an event on CUDA)."""
        if self.flags.is_meta:
            return  # meta tensors carry no values: there is nothing to read back
        if self.flags.device.type == "cpu":
            self._host = (self.flags, self.found)
            return
        host = self.buffers or _host_buffers(self.flags)
        host[0].copy_(self.flags, non_blocking=True)
        host[1].copy_(self.found, non_blocking=True)
        self._host = host
        event = torch.Event(device=self.flags.device)
        event.record()
        self._event = event

    def ready(self) -> bool:
        """Whether :meth:`bad` can answer without waiting for the device."""
        return self._event is None or bool(self._event.query())

    def bad(self) -> tuple[bool, list[str]]:
        """Whether the update was skipped on the device, and the names of the tensors here that caused it.

        Waits only for the copy of this check's outcome (the device may still be busy with later work).
        """
        if self._host is None:
            return False, []
        if self._event is not None:
            self._event.synchronize()
        flags, found = self._host
        names = [name for name, is_bad in zip(self.names, flags.tolist(), strict=True) if is_bad]
        return float(found) != 0.0, names


class Storage:
    """The EMA tensors of one bound module, grouped so that each operation is one kernel call per group.

    Args:
        selected: the tracked tensors (see :func:`lightning_ema._selection.select`).
        sources: initial values, one mapping by name per EMA (``None``: the current weights).
        targets: with a target module, its tensors by name: they are the EMA (nothing is allocated).
        num_emas: how many EMAs (decays) are kept.
        device: where the EMA lives (``None``: with each weight).
        dtype: the EMA's dtype (``None``: see :func:`lightning_ema.functional.ema_dtype_for`).
        side_stream: on CUDA, issue updates on a side stream (see :meth:`issuing`).
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
        self.path = _FORCED_PATH or _path_for(self.groups)
        # Buffers made under `torch.inference_mode` (validate before fit) would refuse in-place updates later.
        with torch.inference_mode(False):
            for group in self.groups:
                self._prepare(group, targets is not None)
        self.stream: Any = None
        self._done: Any = None
        self._hook: Any = None
        self._staged: list[Any] = []
        self._readback: tuple[Tensor, Tensor] | None = None
        self.set_side_stream(side_stream)

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
            # must still be updatable in place and usable by autograd afterwards. An offloaded EMA of CUDA
            # weights is pinned, so that copies between it and the weights need not block.
            pinned = device.type == "cpu" and live.device.type == "cuda"
            with torch.inference_mode(False):
                ema = torch.empty(live.shape, dtype=dtype, device=device, pin_memory=pinned)
        # `inference_mode(False)` turns grad mode back on: keep `no_grad`, or a target's parameters refuse the copy.
        with torch.inference_mode(False), torch.no_grad():
            ema.copy_(initial)
        return ema

    def _prepare(self, group: _Group, targeted: bool) -> None:
        if targeted:
            group.target = list(group.emas[0])
        # Every floating tensor entering the EMA is checked; empty ones cannot hold a NaN.
        group.checked = [i for i, t in enumerate(group.live) if t.is_floating_point() and t.numel()]
        group.checked_names = [group.names[i] for i in group.checked]
        home = group.emas[0][0].device if group.live else None
        if group.live and (self.path == DEFERRED or group.live[0].device != home):
            pinned = home is not None and home.type == "cpu" and group.live[0].device.type == "cuda"
            group.staging = [torch.empty(w.shape, dtype=w.dtype, device=home, pin_memory=pinned) for w in group.live]
        widen = bool(group.live) and group.live[0].dtype != group.emas[0][0].dtype
        if group.kind == AVERAGE and (self.num_emas > 1 or widen):
            group.blocks = _blocks(group.sources, group.emas, BLOCK_BYTES, widen)
        if group.checked and self.path != DEVICE:
            sources = group.sources
            group.small = [i for i in group.checked if sources[i].numel() * sources[i].element_size() <= SMALL_BYTES]
            group.screen = [i for i in group.checked if i not in set(group.small)]
            source = sources[0]
            if group.small:
                group.pack = torch.empty(sum(sources[i].numel() for i in group.small), dtype=source.dtype)
                group.pack = group.pack.to(source.device)
            slots = len(group.screen) + bool(group.small)
            group.sums = torch.zeros(slots, 2, dtype=source.dtype, device=source.device)
            group.slots = [(row[0], row[1]) for row in group.sums.unbind()]

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
                    F.gated_copy_(ema, group.sources, self._on(skip, ema))

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
                        _truncated_average_(ema, sources, weight, None if skip is None else self._on(skip, ema))
                    elif skip is None:
                        F.copy_(ema, sources)
                    else:
                        F.gated_copy_(ema, sources, self._on(skip, ema))
                continue
            parts = [(block.emas, block.weights(sources)) for block in group.blocks] or [(group.emas, sources)]
            for emas, block_weights in parts:
                for ema, weight in zip(emas, group_weights, strict=True):
                    if skip is None:
                        F.lerp_(ema, block_weights, weight)
                    else:
                        F.gated_lerp_(ema, block_weights, weight, self._on(skip, ema))

    @staticmethod
    def _on(flag: Tensor, tensors: list[Tensor]) -> Tensor:
        device = tensors[0].device if tensors else flag.device
        return flag if flag.device == device else flag.to(device, non_blocking=True)

    # ------------------------------------------------------------------ "host" and "deferred" paths
    @torch.no_grad()
    def nonfinite(self) -> tuple[bool, list[str]]:
        """Return whether any checked weight holds NaN or infinity, and the names of those that do.

        One read of every checked weight, allocating nothing: each large tensor's screen (its sum) lands in
        preallocated slots, the small ones are screened together (concatenated into one buffer, one sum), and the
        host reads one list per group. Only a non-finite slot (a NaN or inf, or finite values whose sum
        overflows) leads to the exact check of its tensors, which names them.
        """
        suspicious = []
        for group in self.groups:
            if not group.checked:
                continue
            sources = group.sources
            tensors = [sources[i] for i in group.screen]
            if group.pack is not None:
                small = [sources[i] for i in group.small]
                tensors.append(torch.cat([t.reshape(-1) for t in small], out=group.pack))
            F.screen_into_(tensors, group.slots)
            assert group.sums is not None
            for index, pair in enumerate(group.sums.tolist()):
                if not (math.isfinite(pair[0]) and math.isfinite(pair[1])):
                    positions = [group.screen[index]] if index < len(group.screen) else group.small
                    suspicious += [(group, i) for i in positions]
        finite = F.finite_each([group.sources[i] for group, i in suspicious])
        bad = [group.names[i] for (group, i), ok in zip(suspicious, finite, strict=True) if not ok]
        return bool(bad), bad

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
        self._staged = [self._record(device) for device in devices if device.type not in ("cpu", "meta")]

    def wait_staged(self) -> None:
        """Wait until the copies of :meth:`stage` have landed (normally long done by then)."""
        for event in self._staged:
            event.synchronize()
        self._staged = []

    @staticmethod
    def _record(device: torch.device) -> Any:
        event = torch.Event(device=device)
        event.record()
        return event

    # ------------------------------------------------------------------ "device" path
    @torch.no_grad()
    def device_check(self) -> DeviceCheck | None:
        """Check every checked weight for NaN and infinity on its device, without the host reading anything."""
        checked = [group for group in self.groups if group.checked]
        if not checked:
            return None
        masks = [F.nonfinite_mask([group.sources[i] for i in group.checked]) for group in checked]
        home = masks[0].device
        flags = torch.cat([mask.to(home, non_blocking=True) for mask in masks])
        names = [name for group in checked for name in group.checked_names]
        if flags.device.type not in ("cpu", "meta") and self._readback is None:
            # One outcome is in flight at a time (it is read before the next update is issued): reuse the buffers.
            self._readback = _host_buffers(flags)
        return DeviceCheck(flags, flags.any().float(), names, self._readback)

    @contextmanager
    def issuing(self) -> Iterator[None]:
        """Context in which an update's kernels are issued: on the side stream, if there is one.

        The side stream first waits for the current stream (the optimizer step that wrote the weights); what
        reads the EMA or writes the weights afterwards must call :meth:`wait_for_update` first.
        """
        stream = self.stream
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            yield
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        self._done = done

    def wait_for_update(self) -> None:
        """Make the current stream wait (on the device, the host does not) for the last update's kernels."""
        done = self._done
        if done is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(done)

    def set_side_stream(self, enabled: bool) -> None:
        """Issue updates on a side stream (CUDA, ``"device"`` path, EMA on one device), or stop doing so."""
        self.wait_for_update()
        if self._hook is not None:
            self._hook.remove()
        self.stream = self._done = self._hook = None
        devices = {group.emas[0][0].device for group in self.groups if group.emas[0]}
        if not enabled or self.path != DEVICE or len(devices) != 1 or next(iter(devices)).type != "cuda":
            return  # a side stream per device is not worth its complexity: such EMAs update in stream order
        self.stream = torch.cuda.Stream(device=next(iter(devices)))  # type: ignore[no-untyped-call]
        # Every optimizer step writes weights the side stream may still be reading: make it wait, on the device.
        ref = weakref.ref(self)

        def before_step(*_: Any) -> None:
            storage = ref()
            if storage is not None:
                storage.wait_for_update()

        self._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(before_step)
        weakref.finalize(self, self._hook.remove)

    # ------------------------------------------------------------------ other reads
    def first_device(self) -> torch.device:
        """The device of the first checked weight (where a flag for a collective lives)."""
        for group in self.groups:
            if group.checked:
                return group.live[group.checked[0]].device
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


def _host_buffers(flags: Tensor) -> tuple[Tensor, Tensor]:
    pinned = flags.device.type == "cuda"
    return (
        torch.empty(flags.shape, dtype=torch.bool, pin_memory=pinned),
        torch.empty((), dtype=torch.float32, pin_memory=pinned),
    )


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
