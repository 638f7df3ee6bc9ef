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

``EMA`` is three layers, each holding its own state. :class:`~lightning_ema._binding.BoundEMA` binds the settings
to the module: the selected tensors' storage (:mod:`lightning_ema._groups`), their swaps and sharding.
:class:`~lightning_ema._updates.UpdatableEMA` adds the counters, :meth:`EMA.update` and the outcome of each
update. This class adds the constructor and what reads or replaces the EMA: swaps, copies, the saved state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema._config import (
    BufferPolicy,
    Decay,
    DecayPer,
    EMAConfig,
    IntegerBufferPolicy,
    NonFinitePolicy,
    as_schedules,
)
from lightning_ema._distributed import broadcast_from_rank_zero, rank, world_size
from lightning_ema._state_validation import check_engine_state
from lightning_ema._swaps import copy_by_name
from lightning_ema._updates import UpdatableEMA
from lightning_ema.errors import EMAStateError
from lightning_ema.schedules import DecaySchedule

__all__ = ["EMA", "BufferPolicy", "DecayPer", "EMAConfig", "IntegerBufferPolicy", "NonFinitePolicy", "as_schedules"]


class EMA(UpdatableEMA):
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

    # ------------------------------------------------------------------ binding
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
        return self._rebind_replaced()

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

    # ------------------------------------------------------------------ copies
    def copy_to(self, module: nn.Module | None = None, index: int = 0) -> None:
        """Copy EMA ``index`` into ``module`` (default: the averaged module, whose raw weights are then lost).

        Another module is matched by canonical ``state_dict`` names (an inference copy, an uncompiled twin);
        its tensors that the EMA does not track are left as they are.

        Raises:
            ValueError: if ``module`` is neither ``None`` nor a module.
            EMAStateError: if ``module`` lacks a tracked name or a shape differs; nothing is copied then.
        """
        index = self._check_index(index)
        if module is not None and not isinstance(module, nn.Module):
            raise ValueError(f"`module` must be None or a torch.nn.Module, got {module!r}.")
        if self.is_swapped:
            raise RuntimeError("Cannot copy the EMA into a module while it is swapped in.")
        self._settle()
        if module is None or module is self._module:
            self._swaps.copy_into_module(index)
        else:
            copy_by_name(self._swaps.ema_by_name(index), module)

    # ------------------------------------------------------------------ reads and state
    def ema_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Return EMA ``index`` under the module's ``state_dict`` names (live references, not copies)."""
        index = self._check_index(index)
        self._settle()
        return self._swaps.ema_by_name(index)

    def raw_state_dict(self) -> dict[str, Tensor]:
        """Return the raw values of the tracked tensors by name, wherever a swap has put them."""
        return self._swaps.raw_by_name()

    def relative_distances(self) -> list[Tensor]:
        """Return ``||ema - w|| / ||w||`` over the averaged tensors, one 0-d tensor per EMA, without a host sync.

        It allocates temporaries, so call it every few hundred steps, not every step.
        """
        self._settle()
        return self._swaps.relative_distances()

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
        emas, counters = _checked_state(state, self.num_emas, self.schedules)
        # Names and shapes are checked before anything is written (into a target's tensors too).
        self._storage.side.wait()
        self._rebuild(emas)
        self._pending = None  # an update still in flight belongs to the state that was replaced
        self.num_updates, self.last_update_step, self._step = counters

    def take_rank_zero_buffers(self) -> None:
        """Make every rank hold rank 0's buffer EMA (one broadcast per device and dtype; never on the update path).

        Under DDP the weights agree across ranks after each step but BatchNorm statistics do not: each rank
        updates them from its own batch, and DDP only broadcasts rank 0's at the start of the next forward. So
        rank 0's buffers are the model's, and its buffer EMA is the one every rank should evaluate with. Call it
        on every rank (it is a collective) where the EMA is about to be read; it does nothing in one process.
        """
        self._settle()
        broadcast_from_rank_zero(self._swaps.buffer_emas())


def _checked_state(
    state: Mapping[str, Any], num_emas: int, schedules: Sequence[DecaySchedule]
) -> tuple[list[Mapping[str, Tensor]], tuple[int, int, int]]:
    """Return the EMA mappings and (num_updates, last_update_step, step) of a saved state, or raise.

    Raises:
        EMAStateError: if the state holds another rank's shards, or fails the validation of every EMA state.
    """
    shard = state.get("shard") if isinstance(state, Mapping) else None
    here = {"rank": rank(), "world_size": world_size()}
    if shard is not None and shard != here:
        raise EMAStateError(
            f"The EMA state holds the local shards of rank {shard.get('rank')!r} of {shard.get('world_size')!r}, "
            f"but this is rank {here['rank']} of {here['world_size']}: nothing was loaded. Save and load one EMA "
            "state per rank (sharded EMAs are local to their rank)."
        )
    # --- issue 13: one validation of every EMA state (structure, names, dense finite tensors; _state_validation) ---
    checked = check_engine_state(state, num_emas=num_emas, labels=[repr(schedule) for schedule in schedules])
    return checked["emas"], (checked["num_updates"], checked["last_update_step"], checked["step"])
