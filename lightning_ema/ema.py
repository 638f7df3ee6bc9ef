"""``EMA``: the exponential moving average of a module's weights, for any training loop (torch only).

The engine of every part of lightning-ema: :class:`~lightning_ema.EMACallback`, ``MeanTeacherModule`` and
``PostHocEMA`` are built on it, and plain PyTorch or Lightning Fabric loops use it directly::

    ema = EMA(model, decay=0.999)
    for step, batch in enumerate(loader, start=1):
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step)
    with ema.swapped():
        evaluate(model)

Which tensors are averaged is :mod:`lightning_ema._selection`'s job, their storage and kernels
:mod:`lightning_ema._groups`'s, the step rule :mod:`lightning_ema._policy`'s; this class holds the state
(counters, swaps) and the public surface.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema import functional as F
from lightning_ema import sharding as S
from lightning_ema._config import (
    BufferPolicy,
    Decay,
    DecayPer,
    EMAConfig,
    IntegerBufferPolicy,
    NonFinitePolicy,
    as_schedules,
)
from lightning_ema._device import DeviceCheck
from lightning_ema._distributed import any_rank, broadcast_from_rank_zero, rank, world_size
from lightning_ema._groups import DEVICE, HOST, Storage
from lightning_ema._selection import align_names, fingerprint, localize, select, target_tensors, unmatched_patterns
from lightning_ema._state_validation import check_engine_state
from lightning_ema._swaps import Swaps, copy_by_name
from lightning_ema._validate import check_int
from lightning_ema.errors import EMAStateError, NonFiniteUpdateError
from lightning_ema.schedules import DecaySchedule

__all__ = ["EMA", "BufferPolicy", "DecayPer", "EMAConfig", "IntegerBufferPolicy", "NonFinitePolicy", "as_schedules"]


class EMA:
    """Exponential moving average of a module's ``state_dict`` tensors, updated once per optimizer step.

    After optimizer step ``t`` each selected tensor's EMA moves towards the weight:
    ``ema = decay_t * ema + (1 - decay_t) * w``. Tensors are selected and paired by ``state_dict`` name, kept in
    (device, dtype) groups so that an update is one multi-tensor kernel per group, and nothing is allocated per
    update. The EMA starts as a copy of the module's current weights.

    Args:
        module: the module whose weights are averaged (under Fabric, the module ``fabric.setup`` returns or the
            one it wraps: names are matched without wrapper prefixes).
        decay: a float in [0, 1), a :class:`~lightning_ema.schedules.DecaySchedule`, or a list of them: one
            EMA per decay, all updated in one pass that reads each weight from memory once.
        every_n_steps: update after every n-th optimizer step; an update covering n steps applies the
            product of their decays, so the time constant in steps does not depend on n.
        start_step: the first ``start_step`` optimizer steps copy the weights instead of averaging them.
        device: where the EMA lives; ``None`` keeps each average with its weight, ``"cpu"`` offloads it.
        dtype: EMA dtype; ``None`` keeps float32/float64 and lifts float16/bfloat16 to float32.
        buffers: ``"average"`` floating-point buffers (integer ones are copied), ``"copy"`` them, or ``"ignore"``.
        include: glob patterns over canonical ``state_dict`` names that are averaged (``None``: all).
        exclude: glob patterns over canonical names that are left out. A module may add its own through an
            ``ema_exclude`` attribute (tensors that are averages already, such as a mean teacher's).
        nonfinite: an update meeting a NaN/inf weight raises :class:`~lightning_ema.NonFiniteUpdateError`
            (``"error"``), is skipped with a warning (``"skip"``), or is not checked (``"ignore"``).
        phase: updates after ``start_step`` fall on the optimizer steps ``t`` with
            ``(t - origin) % every_n_steps == phase % every_n_steps`` (``origin``: ``start_step`` with
            ``count_from_start``, else 0). ``phase=1`` updates after steps 1, n + 1, 2n + 1, ... (mmcv's rule).
        count_from_start: start the EMA's clock at ``start_step``: every step up to it copies the weights (not
            only the due ones), update intervals count from it, and schedules see the steps since it, so the first
            averaging update uses ``decay(1)`` (the rule of mmengine's ``begin_iter``, mmagic's ``start_iter`` and
            timm's/diffusers' ``update_after_step``).
        decay_per: ``"step"``: an update covering n optimizer steps applies the product of their n decays;
            ``"update"``: each update applies the schedule's decay at its step once, whatever it covers (the rule
            of mmcv, mmengine, mmdet and mmagic, whose ``interval`` lengthens the EMA's time constant).
        buffer_decay: another decay (float or schedule) for the averaged buffers, e.g. BatchNorm statistics;
            ``None`` uses ``decay``. Only with ``buffers="average"``.
        integer_buffers: with ``buffers="average"``, integer buffers such as ``num_batches_tracked`` are
            ``"copy"``-ed at each update, ``"average"``-d like the others (computed in float32 as
            ``decay * ema + (1 - decay) * w`` and truncated toward zero, as timm's ``ModelEma`` and mmagic do),
            or ``"keep"``-ed: copied only while the EMA copies the weights (up to ``start_step``), left alone by
            averaging updates (mmengine's ``update_buffers=True``).
        stop_step: no update after this optimizer step (the EMA keeps its value); ``None``: never stop.
        target: keep the EMA in this module's tensors of the same names instead of allocating it (a teacher
            that is the EMA of ``module``); its current values are the EMA's start. One decay, no ``device``
            or ``dtype``.

    Raises:
        ValueError: if an argument is invalid; the message names it and its value.
        EMAStateError: if no tensor of ``module`` is selected, or ``target`` lacks some of them.

    Example::

        ema = EMA(model, decay=0.999, every_n_steps=2)
        ema.update(step)                        # after optimizer step `step` (or ema.update() to count calls)
        with ema.swapped():                     # the EMA is in the model inside the block only
            accuracy = evaluate(model)
        torch.save(ema.state_dict(), "ema.pt")  # counters and EMA tensors; ema.load_state_dict(...) resumes
    """

    def __init__(
        self,
        module: nn.Module,
        decay: Decay = 0.9999,
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        buffers: BufferPolicy = "average",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        nonfinite: NonFinitePolicy = "error",
        phase: int = 0,
        count_from_start: bool = False,
        decay_per: DecayPer = "step",
        buffer_decay: float | DecaySchedule | None = None,
        integer_buffers: IntegerBufferPolicy = "copy",
        stop_step: int | None = None,
        target: nn.Module | None = None,
    ) -> None:
        config = EMAConfig.create(
            decay,
            every_n_steps=every_n_steps,
            start_step=start_step,
            device=device,
            dtype=dtype,
            buffers=buffers,
            include=include,
            exclude=exclude,
            nonfinite=nonfinite,
            phase=phase,
            count_from_start=count_from_start,
            decay_per=decay_per,
            buffer_decay=buffer_decay,
            integer_buffers=integer_buffers,
            stop_step=stop_step,
        )
        self._setup(module, config, step=0, target=target)

    @classmethod
    def from_config(
        cls, module: nn.Module, config: EMAConfig, *, step: int = 0, target: nn.Module | None = None
    ) -> EMA:
        """Create the EMA of ``module`` from validated settings, as a copy of its weights at optimizer step ``step``."""
        ema = cls.__new__(cls)
        ema._setup(module, config, step=step, target=target)
        return ema

    def _setup(self, module: nn.Module, config: EMAConfig, *, step: int, target: nn.Module | None) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        if target is not None and (
            target is module or config.device is not None or config.dtype is not None or len(config.schedules) > 1
        ):
            raise ValueError(
                "`target` must be a module other than the tracked one and holds the one EMA with its own devices "
                f"and dtypes, got target={type(target).__name__} with device={config.device!r}, "
                f"dtype={config.dtype!r} and {len(config.schedules)} decays."
            )
        tensors = [*module.named_parameters(), *module.named_buffers()]
        lazy = [name for name, tensor in tensors if nn.parameter.is_lazy(tensor)]
        if lazy:
            raise EMAStateError(
                f"The module has uninitialized (lazy) parameters or buffers {lazy[:5]}: run one forward pass to "
                "materialise them before creating its EMA."
            )
        self.config = config
        self._policy = config.policy
        self._module = module
        self._target = target
        self.num_updates = 0
        #: The optimizer step of the last update (or of the EMA's start).
        self.last_update_step = step
        self._step = step
        #: The decay of each EMA at the last update (``0.0`` for a copy).
        self.last_decays: tuple[float, ...] = ()
        self._pending: _Pending | None = None
        self._side_stream = False
        self._storage = self._build(None)
        for argument, patterns in (("include", config.include), ("exclude", config.exclude)):
            unmatched = unmatched_patterns(module, patterns)
            if unmatched:
                warnings.warn(
                    f"`{argument}` pattern(s) {unmatched} match no state_dict name of the module (names are matched "
                    f"without wrapper prefixes, e.g. {list(map(F.canonical_name, module.state_dict()))[:3]!r}).",
                    UserWarning,
                    stacklevel=3,
                )

    def _build(self, sources: Sequence[Mapping[str, Tensor]] | None) -> Storage:
        """Select the module's tensors and allocate their storage (from ``sources`` by name, or the weights)."""
        module = self._module
        S.reshard_all(module)  # an unsharded FSDP2 root would show full tensors instead of its DTensors
        config = self.config
        selected = select(
            module,
            include=config.include,
            exclude=config.exclude,
            buffers=config.buffers,
            integer_buffers=config.integer_buffers,
        )
        if not selected:
            raise EMAStateError(
                "No tensors of the module are selected for the EMA. Check `include`, `exclude` and `buffers`; "
                f"state_dict names start with {list(module.state_dict())[:5]!r}."
            )
        targets = None
        if self._target is not None:
            targets = align_names(target_tensors(self._target, selected), selected)
        if sources is not None:
            sources = [align_names(localize(source, selected), selected) for source in sources]
        storage = Storage(
            selected,
            sources,
            targets,
            num_emas=len(config.schedules),
            device=config.device,
            dtype=config.dtype,
            side_stream=self._side_stream,
        )
        self._sharding = {name: item.sharding for item in selected if item.sharding for name in item.names}
        self._swaps = Swaps(storage, module, sharded=bool(self._sharding))
        self._fingerprint = self._fingerprint_now()
        return storage

    def _fingerprint_now(self) -> dict[str, Any]:
        now = {"module": fingerprint(self._module)}
        if self._target is not None:
            now["target"] = fingerprint(self._target)
        return now

    # ------------------------------------------------------------------ read-only state
    @property
    def module(self) -> nn.Module:
        """The module whose weights are averaged."""
        return self._module

    @property
    def schedules(self) -> tuple[DecaySchedule, ...]:
        """One schedule per EMA (a float decay is a ``ConstantDecay``)."""
        return self.config.schedules

    @property
    def schedule(self) -> DecaySchedule:
        """The schedule of the first (often the only) EMA."""
        return self.config.schedules[0]

    @property
    def num_emas(self) -> int:
        """How many EMAs are kept, one per decay."""
        return len(self.config.schedules)

    @property
    def step(self) -> int:
        """The last optimizer step :meth:`update` was told of."""
        return self._step

    @property
    def is_swapped(self) -> bool:
        """Whether the EMA is in the module in place of the raw weights."""
        return self._swaps.depth > 0

    @property
    def sharding(self) -> dict[str, S.Sharding]:
        """The layout of every tracked name whose weight is a DTensor; its EMA tensors are local shards."""
        return dict(self._sharding)

    def count_steps_from(self, step: int) -> None:
        """Keep the EMA but count optimizer steps from ``step`` on (a state saved under another step numbering)."""
        step = check_int("step", step, 0)
        self._settle()  # the counters of an update still in flight would be rolled back over the new ones
        self.last_update_step = self._step = step

    # ------------------------------------------------------------------ binding checks
    def refresh(self) -> list[str]:
        """Pair the EMA again with the module's tensors by name if any were replaced; return the names that were.

        A buffer assigned out of place, ``module.to(dtype)``, a device move or SWA's BatchNorm update replace
        tensors behind the EMA's back. The averages are kept and re-paired by name (converted to the EMA dtype
        the new weight calls for). Cheap (a ``state_dict`` walk, no tensor read): call it where evaluation or an
        epoch starts, not per step. Does nothing while swapped.

        Raises:
            EMAStateError: if a tracked tensor changed shape, or tensors appeared or disappeared; it names them.
        """
        if self.is_swapped:
            return []
        self._settle()
        if self._sharding:
            S.reshard_all(self._module)  # after validation an FSDP2 root holds unsharded stand-ins
        now = self._fingerprint_now()
        if now == self._fingerprint:
            return []
        changed = sorted(
            name
            for part, tensors in now.items()
            for name, identity in tensors.items()
            if self._fingerprint.get(part, {}).get(name) != identity
        )
        gone = sorted(set(self._fingerprint["module"]) - set(now["module"]))
        sources = None if self._target is not None else [self._swaps.ema_by_name(k) for k in range(self.num_emas)]
        try:
            self._storage = self._build(sources)
        except EMAStateError as error:
            detail = str(error).replace("The EMA state does not match the model, nothing was loaded; ", "")
            raise EMAStateError(
                f"The module's tensors changed behind the EMA ({changed + gone}); the EMA was left as it was: {detail}"
            ) from None
        return changed + gone

    # ------------------------------------------------------------------ update
    def update(self, step: int | None = None) -> float | None:
        """Update the EMA for optimizer step ``step`` if an update is due.

        With weights and EMA on the CPU the update is checked and applied before this returns. With the EMA on an
        accelerator the host never waits for the device: the check and the decision to skip stay there, and a
        refused or skipped update is reported (raised or warned) by the next call that needs its outcome: the
        next due update, or a read of the EMA (:meth:`ema_state_dict`, :meth:`state_dict`, a swap,
        :meth:`copy_to`). An EMA offloaded to the CPU (``device="cpu"``) of accelerator weights copies them
        without blocking and applies the update there, checked, when the EMA is next needed. Either way the EMA
        never absorbs a non-finite value, and the counters are corrected when the outcome is known.

        Args:
            step: the number of optimizer steps done so far; ``None`` counts calls (one step per call).

        Returns:
            The (first) schedule's decay at ``step`` (``0.0`` for a copy), or ``None`` if no update was due
            or it was skipped for a non-finite weight (on an accelerator: as far as the host knows yet).

        Raises:
            ValueError: if ``step`` is smaller than the last step seen.
            NonFiniteUpdateError: if ``nonfinite="error"`` and a weight is NaN or infinite (on an accelerator:
                a weight of an earlier update, named with its step).
            RuntimeError: if the EMA is swapped into the module.
        """
        if step is None:
            step = self._step + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < self._step:
            raise ValueError(
                f"`step` must be an integer >= the last step seen ({self._step}), got {step!r}. Steps count the "
                "optimizer steps done; start a new EMA for a new run."
            )
        self._step = step
        self._settle(wait=False)
        policy = self._policy
        if not policy.is_due(self.last_update_step, step):
            return None
        if self.is_swapped:
            raise RuntimeError("Cannot update the EMA while EMA weights are swapped into the module.")
        self._settle()  # this update's decay depends on whether the previous one was applied
        storage = self._storage
        last = self.last_update_step
        weights = None if policy.copies(step) else policy.weights(last, step)
        buffer_weights = None if weights is None else policy.buffer_weights(last, step)
        checked = self.config.nonfinite != "ignore"
        pending: _Pending | None = None
        if storage.path == HOST:
            storage.stage()
            storage.wait_staged()
            if checked and not self._all_finite(step):
                return None
            self._apply(weights, buffer_weights)
        elif storage.path == DEVICE:
            with storage.side.issuing():
                storage.stage()
                check = self._device_check() if checked else None
                self._apply(weights, buffer_weights, None if check is None else check.found)
                if check is not None:
                    check.start_readback()
                    pending = _Pending(step, self._counters(), check=check)
        else:  # DEFERRED: applied on the host when the EMA is next needed
            storage.stage()
            pending = _Pending(step, self._counters(), weights=weights, buffer_weights=buffer_weights, deferred=True)
        self._pending = pending
        self.num_updates += 1
        self.last_update_step = step
        self.last_decays = (0.0,) * self.num_emas if weights is None else policy.decays_at(step)
        return self.last_decays[0]

    def _apply(
        self, weights: list[float] | None, buffer_weights: list[float] | None = None, skip: Tensor | None = None
    ) -> None:
        if weights is None:
            self._storage.copy_weights(skip)
        else:
            self._storage.average(weights, buffer_weights, skip)

    def _counters(self) -> tuple[int, int, tuple[float, ...]]:
        return self.num_updates, self.last_update_step, self.last_decays

    def _all_finite(self, step: int) -> bool:
        found, bad = self._storage.nonfinite()
        if self._sharding:
            # Each rank sees only its shards: agree on one decision, or the ranks' EMAs would drift apart.
            found = any_rank(found, self._storage.first_device())
        if not found:
            return True
        self._refuse(step, bad)
        return False

    def _device_check(self) -> DeviceCheck | None:
        check = self._storage.device_check()
        if check is not None and self._distributed_shards():
            # The same agreement as on the host, as a collective on the device flag: the host reads nothing.
            torch.distributed.all_reduce(check.found, op=torch.distributed.ReduceOp.MAX)
        return check

    def _distributed_shards(self) -> bool:
        return bool(self._sharding) and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _refuse(self, step: int, bad: list[str]) -> None:
        """Raise for a refused update (``"error"``) or warn that it was skipped (``"skip"``)."""
        where = f"Weights {bad}" if bad else "Weights of another rank's shards"
        message = f"{where} hold NaN or infinity at optimizer step {step}"
        if self.config.nonfinite == "error":
            raise NonFiniteUpdateError(
                f"{message}; the EMA update was refused and the EMA keeps its last finite value. "
                "Pass nonfinite='skip' to skip such updates with a warning instead."
            )
        warnings.warn(f"{message}; this EMA update is skipped.", RuntimeWarning, stacklevel=4)

    def _settle(self, *, wait: bool = True) -> None:
        """Learn the outcome of an update issued without reading it, and make the EMA current for the host.

        On the ``"device"`` path this reads the check's non-blocking copy (waiting, if ``wait``, only for that
        copy); a skipped update's counters are rolled back and it is reported. On the ``"deferred"`` path the
        staged weights are checked and the update applied (only if ``wait``: a collective may be involved, and
        every rank must do it at the same call). With a side stream, the current stream then waits for the
        update's kernels on the device.
        """
        pending = getattr(self, "_pending", None)
        if pending is not None and (wait or (pending.check is not None and pending.check.ready())):
            self._pending = None
            if pending.deferred:
                self._storage.wait_staged()
                if self.config.nonfinite == "ignore" or self._all_finite_or_roll_back(pending):
                    self._apply(pending.weights, pending.buffer_weights)
            elif pending.check is not None:
                found, bad = pending.check.bad()
                if found:
                    self.num_updates, self.last_update_step, self.last_decays = pending.counters
                    self._refuse(pending.step, bad)
        if wait:
            self._storage.side.wait()

    def _all_finite_or_roll_back(self, pending: _Pending) -> bool:
        try:
            finite = self._all_finite(pending.step)
        except NonFiniteUpdateError:
            self.num_updates, self.last_update_step, self.last_decays = pending.counters
            raise
        if not finite:
            self.num_updates, self.last_update_step, self.last_decays = pending.counters
        return finite

    def relative_distances(self) -> list[Tensor]:
        """Return ``||ema - w|| / ||w||`` over the averaged tensors, one 0-d tensor per EMA, without a host sync.

        It allocates temporaries, so call it every few hundred steps, not every step.
        """
        self._settle()
        return self._storage.relative_distances()

    def use_side_stream(self, enabled: bool = True) -> None:
        """On CUDA, issue each update on a side stream, so that it overlaps the next step's forward pass.

        The side stream waits for the current stream (the optimizer step that wrote the weights) before the
        update; every optimizer step waits for the update (an optimizer step pre-hook; on the device, the host
        never waits), and so does every read of the EMA here (swaps, :meth:`ema_state_dict`, :meth:`state_dict`,
        :meth:`copy_to`). Code that writes the weights outside an optimizer step between two updates must
        call :meth:`ema_state_dict` (or swap) first. Without CUDA, or with EMAs on several devices, updates run
        in stream order as before.
        """
        self._settle()
        self._side_stream = bool(enabled)
        self._storage.set_side_stream(self._side_stream)

    # ------------------------------------------------------------------ swapping
    def swap_in(self, index: int = 0) -> None:
        """Put EMA ``index`` into the module; nested calls (of the same index) only count depth.

        Groups whose EMA shares device and dtype with the weights exchange storage (no copy, no memory);
        the others back the raw weights up first and copy the EMA in.
        """
        index = self._check_index(index)
        if not self._swaps.depth:
            self._settle()
        self._swaps.swap_in(index)

    def swap_out(self, *, force: bool = False) -> None:
        """Restore the raw weights bit-exactly (``force``: whatever the nesting depth)."""
        self._swaps.swap_out(force=force)

    @contextmanager
    def swapped(self, index: int = 0) -> Iterator[nn.Module]:
        """Context in which the module holds EMA ``index``; the raw weights return on exit, also on an exception."""
        self.swap_in(index)
        try:
            yield self._module
        finally:
            self.swap_out()

    def copy_from_module(self) -> None:
        """Set every EMA to the module's current weights, except integer buffers kept by ``integer_buffers="keep"``.

        The counters are left as they are. Used to start a teacher from a student whose weights changed after the
        teacher was made (mmdet's ``MeanTeacherHook`` does this when training starts at iteration 0, leaving the
        teacher's integer buffers alone).

        Raises:
            RuntimeError: if the EMA is swapped into the module.
        """
        if self.is_swapped:
            raise RuntimeError("Cannot copy the module's weights into the EMA while it is swapped in.")
        self._settle()  # an update still in flight must not land after the copy
        self._storage.stage()
        self._storage.wait_staged()
        self._storage.copy_weights(keep_kept=True)

    def copy_to(self, module: nn.Module | None = None, index: int = 0) -> None:
        """Copy EMA ``index`` into ``module`` (default: the averaged module, whose raw weights are then lost).

        Another module is matched by canonical ``state_dict`` names (an inference copy, an uncompiled twin);
        its tensors that the EMA does not track are left as they are.

        Raises:
            EMAStateError: if ``module`` lacks a tracked name or a shape differs; nothing is copied then.
        """
        index = self._check_index(index)
        if self.is_swapped:
            raise RuntimeError("Cannot copy the EMA into a module while it is swapped in.")
        self._settle()
        if module is None or module is self._module:
            self._swaps.copy_into_module(index)
        else:
            copy_by_name(self._swaps.ema_by_name(index), module)

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_emas:
            raise ValueError(f"`index` must be an integer in [0, {self.num_emas}), got {index!r}.")
        return index

    # ------------------------------------------------------------------ state
    def ema_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Return EMA ``index`` under the module's ``state_dict`` names (live references, not copies)."""
        index = self._check_index(index)
        self._settle()
        return self._swaps.ema_by_name(index)

    def raw_state_dict(self) -> dict[str, Tensor]:
        """Return the raw values of the tracked tensors by name, wherever a swap has put them."""
        return self._swaps.raw_by_name()

    def state_dict(self) -> dict[str, Any]:
        """Return counters and EMA tensors: plain values and tensors only (``weights_only`` loadable)."""
        self._settle()
        state: dict[str, Any] = {
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "step": self._step,
            "emas": [self._swaps.ema_by_name(k) for k in range(self.num_emas)],
        }
        if self._sharding:
            # Local shards: only the rank that holds them may load them back (see `load_state_dict`).
            state["shard"] = {"rank": rank(), "world_size": world_size()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load counters and EMA tensors saved by :meth:`state_dict` (of an EMA with the same decays).

        The state holds ``"emas"``, a list with one mapping per decay, or ``"ema"``, the mapping of a single
        EMA (the layout before several decays existed).

        Raises:
            EMAStateError: if the state is malformed, holds another number of EMAs than there are decays, or its
                names or shapes do not match the module. Nothing is loaded then.
        """
        if self.is_swapped:
            raise RuntimeError("Cannot load an EMA state while EMA weights are swapped in.")
        shard = state.get("shard") if isinstance(state, Mapping) else None
        here = {"rank": rank(), "world_size": world_size()}
        if shard is not None and shard != here:
            raise EMAStateError(
                f"The EMA state holds the local shards of rank {shard.get('rank')!r} of {shard.get('world_size')!r}, "
                f"but this is rank {here['rank']} of {here['world_size']}: nothing was loaded. Save and load one EMA "
                "state per rank (sharded EMAs are local to their rank)."
            )
        emas, counters = _checked_state(state, self.num_emas, self.schedules)
        # Names and shapes are checked before anything is written (into a target's tensors too).
        self._storage.side.wait()
        self._storage = self._build(emas)
        self._pending = None  # an update still in flight belongs to the state that was replaced
        self.num_updates, self.last_update_step, self._step = counters

    # ------------------------------------------------------------------ distributed
    def take_rank_zero_buffers(self) -> None:
        """Make every rank hold rank 0's buffer EMA (one broadcast per device and dtype; never on the update path).

        Under DDP the weights agree across ranks after each step but BatchNorm statistics do not: each rank
        updates them from its own batch, and DDP only broadcasts rank 0's at the start of the next forward. So
        rank 0's buffers are the model's, and its buffer EMA is the one every rank should evaluate with. Call it
        on every rank (it is a collective) where the EMA is about to be read; it does nothing in one process.
        """
        self._settle()
        broadcast_from_rank_zero(self._swaps.buffer_emas())


@dataclass
class _Pending:
    """An update issued without the host knowing its outcome yet (see :meth:`EMA._settle`)."""

    step: int
    counters: tuple[int, int, tuple[float, ...]]  # num_updates, last_update_step, last_decays before it
    check: DeviceCheck | None = None
    weights: list[float] | None = None
    buffer_weights: list[float] | None = None
    deferred: bool = False


def _checked_state(
    state: Mapping[str, Any], num_emas: int, schedules: Sequence[DecaySchedule]
) -> tuple[list[Mapping[str, Tensor]], tuple[int, int, int]]:
    """Return the EMA mappings and (num_updates, last_update_step, step) of a saved state, or raise."""
    # --- issue 13: one validation of every EMA state (structure, names, dense finite tensors; _state_validation) ---
    checked = check_engine_state(state, num_emas=num_emas, labels=[repr(schedule) for schedule in schedules])
    return checked["emas"], (checked["num_updates"], checked["last_update_step"], checked["step"])
