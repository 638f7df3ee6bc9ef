"""The EMA state of one module: which tensors are averaged, where the averages live, and when they move.

:class:`EMAAverager` knows nothing of Lightning. It selects tensors by ``state_dict`` name, keeps one EMA
tensor per distinct weight, groups them by (device, dtype) so that an update is one multi-tensor kernel
per group, decides from the optimizer-step count whether and with which decay to update, and exchanges
EMA and raw weights for evaluation. Lists of tensors are built once when a module is bound; the update
path only walks those lists.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_ema import functional as F
from lightning_ema import sharding as S
from lightning_ema._state_validation import check_engine_state, dtype_fits
from lightning_ema._validate import (
    check_choice,
    check_int,
    parse_device,
    parse_dtype,
    parse_patterns,
)
from lightning_ema.errors import EMAStateError, NonFiniteUpdateError
from lightning_ema.schedules import DecaySchedule, as_schedule

__all__ = ["EMAAverager", "EMAStateError", "NonFiniteUpdateError", "as_schedules"]

BufferPolicy = Literal["average", "copy", "ignore"]
NonFinitePolicy = Literal["error", "skip", "ignore"]
_AVERAGE, _COPY = "average", "copy"


def as_schedules(decay: Any, name: str = "decay") -> tuple[DecaySchedule, ...]:
    """Return one schedule per EMA from a float, a schedule, or a non-empty list of distinct ones."""
    if isinstance(decay, (list, tuple)):
        if not decay:
            raise ValueError(f"`{name}` must be a float, a schedule or a non-empty list of them, got {decay!r}.")
        schedules = tuple(as_schedule(item, name) for item in decay)
        if len({repr(schedule) for schedule in schedules}) != len(schedules):
            raise ValueError(f"`{name}` must list distinct decays, got {decay!r}.")
        return schedules
    return (as_schedule(decay, name),)


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
    # With several decays: the group in cache-sized blocks, so each weight is read from memory once for all EMAs.
    blocks: list[_Block] = field(default_factory=list)
    staging: list[Tensor] | None = None
    backup: list[Tensor] | None = field(default=None, repr=False)
    # The tensors of a bound `target` module, which are the EMA; a swap leaves stand-ins in `emas[0]`.
    target: list[Tensor] | None = field(default=None, repr=False)


@dataclass
class _Block:
    """A slice of a group small enough to stay in cache while every EMA of it is updated.

    ``pieces`` are (position in the group, start, stop): a whole tensor (``start`` is ``None``) or a flat chunk
    of a large one. The weights' views are made at each update from the group's live tensor objects, so they
    follow a re-pointed ``.data``; the EMA views are made once (the EMA's storage outlives every swap).
    """

    pieces: list[tuple[int, int | None, int | None]]
    emas: list[list[Tensor]]

    def weights(self, live: list[Tensor]) -> list[Tensor]:
        return [live[p] if start is None else live[p].detach().view(-1)[start:stop] for p, start, stop in self.pieces]


#: Bytes of weights per block when several decays share a pass: well inside a core's L2 + L3 share, so the
#: weights are read from memory once and from cache by the other EMAs' kernels.
BLOCK_BYTES = 4 * 2**20


def _blocks(live: list[Tensor], emas: list[list[Tensor]], block_bytes: int) -> list[_Block]:
    pieces: list[tuple[int, int | None, int | None]] = []
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


def _piece(tensors: list[Tensor], piece: tuple[int, int | None, int | None]) -> Tensor:
    position, start, stop = piece
    return tensors[position] if start is None else tensors[position].view(-1)[start:stop]


@dataclass(frozen=True)
class _Selected:
    names: tuple[str, ...]
    live: Tensor  # the tensor itself, or for a DTensor the view of this rank's shard
    kind: str
    buffer: bool
    sharding: S.Sharding | None = None


class EMAAverager:
    """EMA of selected ``state_dict`` tensors of a module, updated per optimizer step.

    Args:
        decay: a float in [0, 1), a :class:`~lightning_ema.schedules.DecaySchedule`, or a list of them: one
            EMA per decay, all updated in one pass that reads each weight from memory once (cache-sized blocks).
        every_n_steps: update after every n-th optimizer step; an update covering n steps applies the
            product of their decays.
        start_step: the first ``start_step`` optimizer steps copy the weights instead of averaging them.
        device: where the EMA lives; ``None`` keeps each average with its weight.
        dtype: EMA dtype; ``None`` keeps float32/float64 and lifts float16/bfloat16 to float32.
        buffers: ``"average"``, ``"copy"`` or ``"ignore"`` floating-point buffers; integer buffers are
            copied unless ignored.
        include: glob patterns over canonical ``state_dict`` names that are averaged (``None``: all).
        exclude: glob patterns over canonical names that are left out.
        nonfinite: what an update does when a weight is NaN or infinite: ``"error"`` raises
            :class:`NonFiniteUpdateError`, ``"skip"`` warns and leaves the EMA as it was, ``"ignore"``
            skips the check (one read of the weights less per update).

    Raises:
        ValueError: if an argument is invalid; the message names it and its value.
    """

    def __init__(
        self,
        decay: float | DecaySchedule | Sequence[float | DecaySchedule] = 0.9999,
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        buffers: BufferPolicy = "average",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        nonfinite: NonFinitePolicy = "error",
    ) -> None:
        self.schedules = as_schedules(decay)
        #: The decay of each EMA at the last update (``0.0`` for a copy).
        self.last_decays: tuple[float, ...] = ()
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.start_step = check_int("start_step", start_step, 0)
        self.device = parse_device("device", device)
        self.dtype = parse_dtype("dtype", dtype)
        self.buffers = check_choice("buffers", buffers, ("average", "copy", "ignore"))
        self.include = parse_patterns("include", include)
        self.exclude = parse_patterns("exclude", exclude)
        self.nonfinite = check_choice("nonfinite", nonfinite, ("error", "skip", "ignore"))
        self.num_updates = 0
        self.last_update_step = 0
        self._groups: list[_Group] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._module: nn.Module | None = None
        self._target: nn.Module | None = None
        self._pending: dict[str, Any] | None = None
        self._swap_depth = 0
        self._swap_index = 0
        self._sharding: dict[str, S.Sharding] = {}

    @property
    def schedule(self) -> DecaySchedule:
        """The schedule of the first (often the only) EMA."""
        return self.schedules[0]

    @property
    def num_emas(self) -> int:
        """How many EMAs are kept, one per decay."""
        return len(self.schedules)

    # ------------------------------------------------------------------ binding
    @property
    def is_bound(self) -> bool:
        """Whether EMA tensors exist for a module."""
        return self._module is not None

    @property
    def has_pending_state(self) -> bool:
        """Whether a loaded state waits for a module to be bound."""
        return self._pending is not None

    def bound_to(self, module: nn.Module) -> bool:
        """Whether the EMA tracks exactly this module object."""
        return self._module is module

    def reset(self) -> None:
        """Forget the EMA, any pending state and the counters; the next :meth:`bind` starts afresh."""
        if self._swap_depth:
            raise RuntimeError("Cannot reset the EMA while EMA weights are swapped in.")
        self.num_updates = 0
        self.last_update_step = 0
        self._groups = []
        self._where = {}
        self._module = None
        self._target = None
        self._pending = None

    def bind(
        self,
        module: nn.Module,
        step: int,
        *,
        target: nn.Module | None = None,
        extra_exclude: Sequence[str] = (),
    ) -> None:
        """Track ``module``'s selected tensors.

        The EMA comes from, in this order: a state loaded with :meth:`load_state_dict` before binding; the
        EMA of a previously bound module with the same names and shapes (rebinding keeps the averages); a
        copy of the module's current tensors, taken as the EMA at optimizer step ``step``.

        With ``target``, the EMA tensors are not allocated: they are ``target``'s tensors of the same
        ``state_dict`` names (a mean teacher of ``module``), updated in place and used as they are, with their
        devices and dtypes. Their current values are the EMA, unless a loaded state waits, which is copied
        into them. While swapped in, ``module`` shares the target's storage and the target keeps its values.

        ``extra_exclude`` adds glob patterns to ``exclude`` for this binding (a module that declares tensors no
        EMA should average, such as a mean teacher's).

        Raises:
            EMAStateError: if a loaded or previous EMA, or ``target``, does not match the module's names and
                shapes.
            ValueError: if ``target`` is ``module`` itself, or is combined with a ``device`` or ``dtype``.
        """
        if self._swap_depth:
            raise RuntimeError("Cannot bind a module while EMA weights are swapped in.")
        if target is not None and (
            target is module or self.device is not None or self.dtype is not None or self.num_emas > 1
        ):
            raise ValueError(
                "`target` must be a module other than the tracked one and holds the one EMA with its own devices "
                f"and dtypes, got target={type(target).__name__} with device={self.device!r}, "
                f"dtype={self.dtype!r} and {self.num_emas} decays."
            )
        S.reshard_all(module)  # an unsharded FSDP2 root would show full tensors instead of its DTensors
        selected = self._select(module, tuple(extra_exclude))
        if not selected:
            raise EMAStateError(
                "No tensors of the module are selected for the EMA. Check `include`, `exclude` and `buffers`; "
                f"state_dict names start with {list(module.state_dict())[:5]!r}."
            )
        previous: list[Mapping[str, Tensor]] | None = None
        if self._module is not None:
            previous = [self._ema_by_name(k) for k in range(self.num_emas)]
        pending, self._pending = self._pending, None
        sources = pending["emas"] if pending is not None else previous
        targets = None
        if target is not None:
            targets = _align_names(_target_tensors(target, selected), selected)
            sources = pending["emas"] if pending is not None else None  # the target holds the EMA
        if sources is not None:
            sources = [_align_names(_localize(source, selected), selected) for source in sources]
        self._build_groups(selected, sources, targets)
        self._module = module
        self._target = target
        self._sharding = {name: item.sharding for item in selected if item.sharding for name in item.names}
        if pending is not None:
            self.num_updates = int(pending["num_updates"])
            self.last_update_step = int(pending["last_update_step"])
        elif previous is None:
            self.num_updates = 0
            self.last_update_step = step

    def _select(self, module: nn.Module, extra_exclude: tuple[str, ...] = ()) -> list[_Selected]:
        exclude = (self.exclude or ()) + extra_exclude or None
        parameters = {id(p) for p in module.parameters()}
        names_of: dict[int, list[str]] = {}
        tensor_of: dict[int, Tensor] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not isinstance(tensor, Tensor):
                continue
            if not F.is_selected(F.canonical_name(name), self.include, exclude):
                continue
            names_of.setdefault(id(tensor), []).append(name)
            tensor_of[id(tensor)] = tensor
        selected = []
        for key, names in names_of.items():
            tensor = tensor_of[key]
            floating = tensor.is_floating_point()
            if key in parameters:
                kind = _AVERAGE if floating else _COPY
            elif self.buffers == "ignore":
                continue
            else:
                kind = _AVERAGE if floating and self.buffers == "average" else _COPY
            if S.is_sharded(tensor):
                selected.append(
                    _Selected(tuple(names), S.local_view(tensor), kind, key not in parameters, S.sharding_of(tensor))
                )
            else:
                selected.append(_Selected(tuple(names), tensor, kind, key not in parameters))
        return selected

    def _build_groups(
        self,
        selected: list[_Selected],
        sources: list[Mapping[str, Tensor]] | None,
        targets: Mapping[str, Tensor] | None = None,
    ) -> None:
        by_key: dict[tuple[Any, ...], _Group] = {}
        index_of: dict[tuple[Any, ...], int] = {}
        where: dict[str, tuple[int, int]] = {}
        for item in selected:
            live = item.live
            if item.kind == _AVERAGE:
                dtype = F.ema_dtype_for(live.dtype, self.dtype)
            else:
                dtype = live.dtype
            device = self.device if self.device is not None else live.device
            emas = []
            for k in range(self.num_emas):
                initial = sources[k][item.names[0]] if sources is not None else live.detach()
                if targets is not None:
                    ema = targets[item.names[0]]
                    if sources is None:
                        initial = ema  # the target's values are the EMA
                else:
                    ema = torch.empty(live.shape, dtype=dtype, device=device)
                if initial is not ema:
                    with torch.no_grad():
                        ema.copy_(initial)
                emas.append(ema)
            sharded = item.sharding is not None
            key = (item.kind, item.buffer, sharded, live.device, live.dtype, emas[0].device, emas[0].dtype)
            group = by_key.get(key)
            if group is None:
                # FSDP2 all-gathers from its own storage: a sharded EMA must be copied in, not exchanged.
                exchangeable = not sharded and live.device == emas[0].device and live.dtype == emas[0].dtype
                group = by_key[key] = _Group(
                    item.kind, item.buffer, [], [[] for _ in range(self.num_emas)], [], exchangeable
                )
                index_of[key] = len(index_of)
            position = len(group.live)
            group.live.append(live)
            for k, ema in enumerate(emas):
                group.emas[k].append(ema)
            group.names.append(item.names[0])
            for name in item.names:
                where[name] = (index_of[key], position)
        self._groups = list(by_key.values())
        self._where = where
        if targets is not None:
            for group in self._groups:
                group.target = list(group.emas[0])
        for group in self._groups:
            # Every floating tensor entering the EMA is checked; empty ones have no maximum to take.
            floating = [(t, n) for t, n in zip(group.live, group.names, strict=True) if t.is_floating_point()]
            group.checked = [t for t, _ in floating if t.numel()]
            group.checked_names = [n for t, n in floating if t.numel()]
            if group.live and group.live[0].device != group.emas[0][0].device:
                group.staging = [
                    torch.empty_like(e, dtype=w.dtype) for e, w in zip(group.emas[0], group.live, strict=True)
                ]
            elif self.num_emas > 1 and group.kind == _AVERAGE:
                group.blocks = _blocks(group.live, group.emas, BLOCK_BYTES)

    # ------------------------------------------------------------------ update
    def update(self, step: int) -> float | None:
        """Update the EMA for optimizer step ``step`` if an update is due.

        An update is due when a multiple of ``every_n_steps`` lies in ``(last_update_step, step]``. Steps up
        to ``start_step`` copy the weights; later ones average with the product of the per-step decays of
        the steps the update covers, so the EMA's time constant in optimizer steps does not depend on
        ``every_n_steps``.

        With several decays, each EMA moves with its own decay in the same pass over the groups; the
        decays of all of them are in :attr:`last_decays` afterwards.

        Returns:
            The (first) schedule's decay at ``step`` (``0.0`` for a copy), or ``None`` if no update was due
            or it was skipped for a non-finite weight.

        Raises:
            NonFiniteUpdateError: if ``nonfinite="error"`` and a weight is NaN or infinite.
        """
        n = self.every_n_steps
        if step // n <= self.last_update_step // n:
            return None
        if self._swap_depth:
            raise RuntimeError("Cannot update the EMA while EMA weights are swapped into the module.")
        if self.nonfinite != "ignore" and not self._all_finite(step):
            return None
        if step <= self.start_step:
            for group in self._groups:
                for ema in group.emas:
                    F.copy_(ema, group.live)
            self.last_decays = (0.0,) * self.num_emas
        else:
            first = max(self.last_update_step, self.start_step) + 1
            weights = [1.0 - schedule.interval_decay(first, step) for schedule in self.schedules]
            for group in self._groups:
                live = group.live
                if group.blocks:
                    for block in group.blocks:
                        block_weights = block.weights(live)
                        for block_ema, weight in zip(block.emas, weights, strict=True):
                            F.lerp_(block_ema, block_weights, weight)
                    continue
                if group.staging is not None:
                    F.copy_(group.staging, live)
                    live = group.staging
                for ema, weight in zip(group.emas, weights, strict=True):
                    if group.kind == _AVERAGE:
                        F.lerp_(ema, live, weight)
                    else:
                        F.copy_(ema, live)
            self.last_decays = tuple(schedule(step) for schedule in self.schedules)
        self.num_updates += 1
        self.last_update_step = step
        return self.last_decays[0]

    def relative_distances(self) -> list[Tensor]:
        """Return ``||ema - w|| / ||w||`` over the averaged tensors, one 0-d tensor per EMA, without a host sync.

        The result stays on the device of the first group (pass it to ``self.log`` as it is). It allocates
        temporaries, so call it every few hundred steps, not every step.
        """
        self._require_bound()
        groups = [group for group in self._groups if group.kind == _AVERAGE and group.checked]
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

    def _all_finite(self, step: int) -> bool:
        checked = [group for group in self._groups if group.checked]
        flags = [F.nonfinite_mask(group.checked) for group in checked]
        found = any(bool(flag.any()) for flag in flags)
        if self._sharding and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each rank sees only its shards: agree on one decision, or the ranks' EMAs would drift apart.
            anywhere = torch.tensor([int(found)], dtype=torch.int32, device=checked[0].checked[0].device)
            torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
            found = bool(anywhere.item())
        if not found:
            return True
        bad = [
            name
            for group, flag in zip(checked, flags, strict=True)
            for name, is_bad in zip(group.checked_names, flag.tolist(), strict=True)
            if is_bad
        ]
        where = f"Weights {bad}" if bad else "Weights of another rank's shards"
        message = f"{where} hold NaN or infinity at optimizer step {step}"
        if self.nonfinite == "error":
            raise NonFiniteUpdateError(
                f"{message}; the EMA update was refused and the EMA keeps its last finite value. "
                "Pass nonfinite='skip' to skip such updates with a warning instead."
            )
        warnings.warn(f"{message}; this EMA update is skipped.", RuntimeWarning, stacklevel=3)
        return False

    # ------------------------------------------------------------------ swapping
    @property
    def is_swapped(self) -> bool:
        """Whether the EMA is in the module in place of the raw weights."""
        return self._swap_depth > 0

    def swap_in(self, index: int = 0) -> None:
        """Put EMA number ``index`` into the module; nested calls (of the same index) only count depth.

        Groups whose EMA shares device and dtype with the weights exchange storage (no copy, no memory);
        the others back the raw weights up first and copy the EMA in.
        """
        self._require_bound()
        index = self._check_index(index)
        if self._swap_depth and index != self._swap_index:
            raise RuntimeError(f"EMA {self._swap_index} is swapped in; swap it out before swapping in EMA {index}.")
        if self._swap_depth == 0:
            if self._sharding:
                S.reshard_all(self._module)  # type: ignore[arg-type]
            copied = [group for group in self._groups if not group.exchangeable]
            # Allocate every backup before touching the module, so a failure here changes nothing.
            backups = [
                [w.detach().to(e.device, copy=True) for w, e in zip(g.live, g.emas[index], strict=True)] for g in copied
            ]
            for group, backup in zip(copied, backups, strict=True):
                group.backup = backup
                F.copy_(group.live, group.emas[index])
            for group in self._groups:
                if group.exchangeable:
                    F.exchange_(group.live, group.emas[index])
            self._swap_index = index
        self._swap_depth += 1

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_emas:
            raise ValueError(f"`index` must be an integer in [0, {self.num_emas}), got {index!r}.")
        return index

    def swap_out(self, *, force: bool = False) -> None:
        """Restore the raw weights bit-exactly (``force``: whatever the nesting depth)."""
        if self._swap_depth == 0:
            return
        self._swap_depth = 0 if force else self._swap_depth - 1
        if self._swap_depth:
            return
        if self._sharding:
            # Validation leaves the FSDP2 root unsharded with the EMA in it; reshard before restoring the shards.
            S.reshard_all(self._module)  # type: ignore[arg-type]
        for group in self._groups:
            if group.exchangeable:
                F.exchange_(group.live, group.emas[self._swap_index])
                if group.target is not None:
                    group.emas[0][:] = group.target  # the target's own tensors again, not views of its storage
            elif group.backup is not None:
                F.copy_(group.live, group.backup)
                group.backup = None

    @contextmanager
    def swapped(self, index: int = 0) -> Iterator[None]:
        """Context in which the module holds EMA ``index``; the raw weights return on exit, also on an exception."""
        self.swap_in(index)
        try:
            yield
        finally:
            self.swap_out()

    def copy_to_module(self, index: int = 0) -> None:
        """Overwrite the module's selected tensors with EMA ``index`` (the raw weights are lost)."""
        self._require_bound()
        index = self._check_index(index)
        if self._swap_depth:
            raise RuntimeError("Cannot copy the EMA into the module while it is swapped in.")
        for group in self._groups:
            F.copy_(group.live, group.emas[index])

    # ------------------------------------------------------------------ state
    def _require_bound(self) -> None:
        if self._module is None:
            raise RuntimeError("The EMA has not been created yet: it is created when training starts.")

    def _ema_by_name(self, index: int = 0) -> dict[str, Tensor]:
        exchanged = self._swap_depth > 0 and index == self._swap_index
        result = {}
        for name, (g, i) in self._where.items():
            group = self._groups[g]
            tensor = group.live[i] if exchanged and group.exchangeable else group.emas[index][i]
            result[name] = tensor.detach()
        return result

    def raw_by_name(self) -> dict[str, Tensor]:
        """Return the raw values of the tracked tensors by name, wherever a swap has put them."""
        result = {}
        for name, (g, i) in self._where.items():
            group = self._groups[g]
            if self._swap_depth and group.exchangeable:
                tensor = group.emas[self._swap_index][i]
            elif self._swap_depth and group.backup is not None:
                tensor = group.backup[i]
            else:
                tensor = group.live[i]
            result[name] = tensor.detach()
        return result

    def buffer_ema(self) -> list[Tensor]:
        """Return the EMA tensors of the tracked buffers, wherever a swap has put them (for in-place syncing)."""
        result = []
        for group in (group for group in self._groups if group.buffer):
            for k, emas in enumerate(group.emas):
                exchanged = self._swap_depth > 0 and k == self._swap_index and group.exchangeable
                result.extend(group.live if exchanged else emas)
        return result

    @property
    def sharding(self) -> dict[str, S.Sharding]:
        """The layout of every tracked name whose weight is a DTensor; its EMA tensors are local shards."""
        return dict(self._sharding)

    def take_rank_zero_buffers(self) -> None:
        """Make every rank hold rank 0's buffer EMA (one broadcast per device and dtype; never on the update path).

        Under DDP the weights agree across ranks after each step but BatchNorm statistics do not: each rank
        updates them from its own batch, and DDP only broadcasts rank 0's at the start of the next forward. So
        rank 0's buffers are the model's, and its buffer EMA is the one every rank should evaluate with. Call it
        on every rank (it is a collective) where the EMA is about to be read; it does nothing in one process.
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_world_size() < 2 or not self.is_bound:
            return
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for tensor in self.buffer_ema():
            by_kind.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        for group in by_kind.values():
            flat = torch.cat([tensor.reshape(-1) for tensor in group])
            torch.distributed.broadcast(flat, src=0)
            chunks = torch.split(flat, [tensor.numel() for tensor in group])
            torch._foreach_copy_(group, [chunk.view_as(tensor) for chunk, tensor in zip(chunks, group, strict=True)])

    def ema_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Return EMA ``index`` under the module's ``state_dict`` names (live references, not copies)."""
        self._require_bound()
        return self._ema_by_name(self._check_index(index))

    def state_dict(self) -> dict[str, Any]:
        """Return counters and EMA tensors: only plain values and tensors (``weights_only`` loadable)."""
        if self._module is None and self._pending is not None:
            return dict(self._pending)
        self._require_bound()
        return {
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "emas": [self._ema_by_name(k) for k in range(self.num_emas)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load counters and EMA tensors; applied at once if a module is bound, else when one is.

        The state holds ``"emas"``, a list with one mapping per decay, or ``"ema"``, the mapping of a single
        EMA (the layout before several decays existed).

        Raises:
            EMAStateError: if the state is malformed (structure, names, tensors that are not plain dense ones, NaN
                or infinity), holds another number of EMAs than there are decays, or if a module is bound and the
                state's names, shapes or dtypes do not match it. Nothing is loaded then.
        """
        # --- issue 13: one validation of every EMA state (lightning_ema/_state_validation.py) ---
        pending = check_engine_state(state, num_emas=self.num_emas)
        if self._module is None:
            self._pending = pending
            return
        if self._swap_depth:
            raise RuntimeError("Cannot load an EMA state while EMA weights are swapped in.")
        module, self._pending = self._module, pending
        self._module = None
        try:
            self.bind(module, self.last_update_step, target=self._target)
        except Exception:
            self._module, self._pending = module, None
            raise


def _target_tensors(target: nn.Module, selected: list[_Selected]) -> dict[str, Tensor]:
    """Return ``target``'s ``state_dict`` tensors (the objects, not copies) of the names that are selected."""
    wanted = {F.canonical_name(name) for item in selected for name in item.names}
    return {
        name: tensor
        for name, tensor in target.state_dict(keep_vars=True).items()
        if isinstance(tensor, Tensor) and F.canonical_name(name) in wanted
    }


def _localize(source: Mapping[str, Tensor], selected: list[_Selected]) -> Mapping[str, Tensor]:
    """Replace full tensors of sharded entries by this rank's shard (a full-file checkpoint of a sharded run)."""
    sharded = {name: item for item in selected if item.sharding is not None for name in item.names}
    if not sharded:
        return source
    result = dict(source)
    for name, item in sharded.items():
        tensor = source.get(name)
        sharding = item.sharding
        if tensor is not None and sharding is not None and tensor.shape != item.live.shape:
            if tensor.shape == sharding.shape:
                result[name] = S.cut_local_shard(tensor.to(item.live.device), sharding)
    return result


def _align_names(source: Mapping[str, Tensor], selected: list[_Selected]) -> Mapping[str, Tensor]:
    """Return ``source`` keyed by the module's names, or raise listing every name or shape that differs.

    Names that differ only by wrapper components (a checkpoint of a compiled module loaded into an
    uncompiled one) are matched through their canonical form.
    """
    expected = {name: item.live.shape for item in selected for name in item.names}
    if set(source) != set(expected):
        by_canonical = {F.canonical_name(name): name for name in source}
        renamed = {name: by_canonical.get(F.canonical_name(name)) for name in expected}
        if None not in renamed.values() and len(source) == len(expected):
            source = {name: source[old] for name, old in renamed.items() if old is not None}
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected))
    mismatched = sorted(
        f"{name}: EMA {tuple(source[name].shape)} vs model {tuple(shape)}"
        for name, shape in expected.items()
        if name in source and source[name].shape != shape
    )
    # issue 13: an EMA whose dtype cannot hold its weight (an int64 EMA of a float weight) is refused, not cast
    dtypes = {name: item.live.dtype for item in selected for name in item.names}
    wrong_dtype = sorted(
        f"{name}: EMA {source[name].dtype} vs model {dtype}"
        for name, dtype in dtypes.items()
        if name in source and not dtype_fits(source[name].dtype, dtype)
    )
    if missing or unexpected or mismatched or wrong_dtype:
        problems = []
        if missing:
            problems.append(f"missing from the EMA: {missing}")
        if unexpected:
            problems.append(f"not in the model: {unexpected}")
        if mismatched:
            problems.append(f"shape differs: {mismatched}")
        if wrong_dtype:
            problems.append(f"dtype cannot hold the weight: {wrong_dtype}")
        raise EMAStateError("The EMA state does not match the model, nothing was loaded; " + "; ".join(problems) + ".")
    return source
