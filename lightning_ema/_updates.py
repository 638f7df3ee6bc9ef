"""Updating an EMA: the counters, the step entry, and whether each update lands, is refused or is skipped.

Torch only. :class:`UpdatableEMA` is the second layer of :class:`~lightning_ema.EMA`, on the binding of
:class:`~lightning_ema._binding.BoundEMA`. An update takes its storage's path (:mod:`lightning_ema._groups`):

- ``"host"``: the weights are checked, then the update applied, before :meth:`UpdatableEMA.update` returns;
- ``"device"``: the check and the skip decision stay on the device, and the host reads the outcome later;
- ``"deferred"``: the weights are staged, then checked and applied on the host when the EMA is next needed.

The counters move on when an update is issued. An outcome that arrives later (:class:`_Pending`) and says that the
update was refused or skipped rolls them back to what they were before it, and is reported (raised or warned) by
the call that learns it (:meth:`UpdatableEMA._settle`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ema._binding import BoundEMA
from lightning_ema._config import EMAConfig
from lightning_ema._device import DeviceCheck
from lightning_ema._distributed import any_rank
from lightning_ema._groups import DEVICE, HOST
from lightning_ema._validate import as_int, check_int
from lightning_ema.errors import NonFiniteUpdateError

__all__ = ["UpdatableEMA"]

#: num_updates, last_update_step, last_decays
_Counters = tuple[int, int, tuple[float, ...]]


@dataclass
class _Pending:
    """An update issued without the host knowing its outcome yet (see :meth:`UpdatableEMA._settle`)."""

    step: int
    counters: _Counters  # before the update: what a refused or skipped update rolls back to
    check: DeviceCheck | None = None
    weights: list[float] | None = None
    buffer_weights: list[float] | None = None
    deferred: bool = False


class UpdatableEMA(BoundEMA):
    """The counters of a bound EMA, its step rule, and the outcome of each update."""

    def _setup(self, module: nn.Module, config: EMAConfig, *, step: int, target: nn.Module | None) -> None:
        """Bind to ``module`` and count optimizer steps from ``step`` (see :class:`~lightning_ema.EMA`)."""
        self._bind(module, config, target)
        self._policy = config.policy
        self.num_updates = 0
        #: The optimizer step of the last update (or of the EMA's start).
        self.last_update_step = step
        self._step = step
        #: The decay of each EMA at the last update (``0.0`` for a copy).
        self.last_decays: tuple[float, ...] = ()
        self._pending: _Pending | None = None

    @property
    def step(self) -> int:
        """The last optimizer step :meth:`update` was told of."""
        return self._step

    def count_steps_from(self, step: int) -> None:
        """Keep the EMA but count optimizer steps from ``step`` on (a state saved under another step numbering)."""
        step = check_int("step", step, 0)
        self._settle()  # the counters of an update still in flight would be rolled back over the new ones
        self.last_update_step = self._step = step

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
        number = self._step + 1 if step is None else as_int(step)
        if number is None or number < self._step:
            raise ValueError(
                f"`step` must be an integer >= the last step seen ({self._step}), got {step!r}. Steps count the "
                "optimizer steps done; start a new EMA for a new run."
            )
        step = self._step = number
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

    def _apply(
        self, weights: list[float] | None, buffer_weights: list[float] | None = None, skip: Tensor | None = None
    ) -> None:
        if weights is None:
            self._storage.copy_weights(skip)
        else:
            self._storage.average(weights, buffer_weights, skip)

    def _counters(self) -> _Counters:
        return self.num_updates, self.last_update_step, self.last_decays

    def _roll_back(self, pending: _Pending) -> None:
        """Give the counters back the values they had before ``pending``'s update (refused or skipped)."""
        self.num_updates, self.last_update_step, self.last_decays = pending.counters

    # ------------------------------------------------------------------ the checks
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
        # A narrower EMA dtype refuses finite weights beyond its range too (they would become infinities).
        beyond = " (or values beyond the range of the EMA's dtype)" if self._storage.narrowing else ""
        message = f"{where} hold NaN or infinity{beyond} at optimizer step {step}"
        if self.config.nonfinite == "error":
            raise NonFiniteUpdateError(
                f"{message}; the EMA update was refused and the EMA keeps its last finite value. "
                "Pass nonfinite='skip' to skip such updates with a warning instead."
            )
        warnings.warn(f"{message}; this EMA update is skipped.", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ the outcome
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
                    self._roll_back(pending)
                    self._refuse(pending.step, bad)
        if wait:
            self._storage.side.wait()

    def _all_finite_or_roll_back(self, pending: _Pending) -> bool:
        try:
            finite = self._all_finite(pending.step)
        except NonFiniteUpdateError:
            self._roll_back(pending)
            raise
        if not finite:
            self._roll_back(pending)
        return finite

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
