"""``PostHocEMA``: power-function EMAs snapshotted during training, and a sweep over synthesised EMA lengths.

The callback is an :class:`~lightning_ema.EMACallback` with one ``KarrasDecay`` per ``sigma_rel`` (all updated in one
pass over the weights) that saves snapshots of its EMAs every ``snapshot_every_n_steps`` optimizer steps. The math
and the file format live in :mod:`lightning_ema.posthoc`; what a rank writes and a resumed run moves aside in
``_posthoc_writing``; :func:`sweep` (re-exported here) in ``_posthoc_sweep``.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_ema._posthoc_sweep import sweep
from lightning_ema._posthoc_writing import (
    check_sigma_rels,
    resolve_file_format,
    shard_regions,
    snapshot_tensors,
    supersede_after,
)
from lightning_ema._validate import check_choice, check_int, parse_dtype
from lightning_ema.callback import EMACallback
from lightning_ema.ema import BufferPolicy, NonFinitePolicy
from lightning_ema.posthoc import DEFAULT_MAX_ERROR, SUPERSEDED, snapshot_filename, write_snapshot
from lightning_ema.schedules import KarrasDecay

__all__ = ["PostHocEMA", "sweep"]

_STATE = "posthoc"


class PostHocEMA(EMACallback):
    """Track power-function EMAs and snapshot them, so that any EMA length can be synthesised after training.

    Post-hoc EMA of Karras et al. 2024 (EDM2, §3 and Appendix C): one EMA per ``sigma_rel`` with the decay
    ``KarrasDecay(sigma_rel=...)``, all updated in one pass over the weights, and every ``snapshot_every_n_steps``
    optimizer steps a snapshot of all of them in ``dirpath``. After training,
    :func:`lightning_ema.posthoc.synthesize` turns the snapshots into the EMA of any ``sigma_rel`` (best between
    and near the tracked ones), and :meth:`sweep` validates a list of them with a Trainer.

    Snapshots are written atomically (``step-0000001000.safetensors``, or ``.pt`` readable with
    ``torch.load(weights_only=True)``), under DDP by rank 0, under FSDP2 by every rank for its own shards
    (``step-0000001000.rank1-of-2.pt``), with nothing gathered. The EMAs, counters and the step of the last snapshot
    are in the Lightning checkpoint, so ``trainer.fit(ckpt_path=...)`` continues the sequence without a gap or a
    duplicate; snapshots after the step a run starts from (those an interrupted run wrote after its last checkpoint,
    or all of an earlier run in the same folder when training starts at step 0) are moved to ``dirpath/superseded``,
    where synthesis does not read them.

    Args:
        sigma_rels: the relative widths of the tracked EMAs (a float or several distinct ones in ``(0, 0.2887]``;
            EDM2 tracks 0.05 and 0.10). Two bracketing the widths you expect to want cover a range well.
        snapshot_every_n_steps: save a snapshot every this many optimizer steps (a multiple of ``every_n_steps``).
            Denser snapshots reconstruct narrower EMAs; for a run of ``T`` steps, ``T / 50`` to ``T / 100`` is ample.
        dirpath: the snapshot folder; ``None`` is ``<default_root_dir>/posthoc_ema`` of the Trainer.
        snapshot_dtype: the dtype floating tensors are saved in (``"float16"`` halves the storage); ``None`` keeps the
            EMA's dtype. The EMAs themselves stay in ``dtype``.
        every_n_steps: update the EMAs every n optimizer steps with the exact product of the n per-step decays.
        file_format: ``"safetensors"``, ``"torch"`` (``.pt``) or ``"auto"`` (safetensors when it is installed).
        device: where the EMAs live, as for ``EMACallback``.
        dtype: the EMAs' dtype, as for ``EMACallback``.
        buffers: the treatment of buffers, as for ``EMACallback``.
        include: glob patterns of the tensors averaged, as for ``EMACallback``.
        exclude: glob patterns of the tensors left out, as for ``EMACallback``.
        evaluate: what validation, test and predict run with: ``"raw"`` (default: the raw weights), one of
            ``sigma_rels`` (that EMA swapped in), or ``"ema"``/``"both"`` as for ``EMACallback`` (every tracked EMA,
            each under its suffix ``_ema0``, ``_ema1``, ...).
        nonfinite: what an update meeting NaN/inf weights does, as for ``EMACallback``.
        suffix: the log-name suffix of EMA passes, as for ``EMACallback``.
        distance_every_n_steps: how often ``ema/distance`` is logged, as for ``EMACallback``.

    Raises:
        ValueError: if an argument is invalid; the message names it and its value.

    Example::

        posthoc = PostHocEMA(sigma_rels=(0.05, 0.10), snapshot_every_n_steps=500)
        trainer = Trainer(max_steps=50_000, callbacks=[posthoc])
        trainer.fit(model, datamodule)
        results = posthoc.sweep(trainer, model, [0.03, 0.05, 0.07, 0.10, 0.15], datamodule=datamodule)
    """

    def __init__(
        self,
        sigma_rels: float | Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every_n_steps: int,
        dirpath: str | os.PathLike[str] | None = None,
        snapshot_dtype: str | torch.dtype | None = None,
        every_n_steps: int = 1,
        file_format: str = "auto",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        buffers: BufferPolicy = "average",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        evaluate: str | float = "raw",
        nonfinite: NonFinitePolicy = "error",
        suffix: str = "_ema",
        distance_every_n_steps: int = 100,
    ) -> None:
        self.sigma_rels = check_sigma_rels(sigma_rels)
        every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.snapshot_every_n_steps = check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1)
        if self.snapshot_every_n_steps % every_n_steps:
            raise ValueError(
                f"`snapshot_every_n_steps` must be a multiple of every_n_steps={every_n_steps}, got "
                f"{snapshot_every_n_steps!r}: a snapshot is taken right after an EMA update."
            )
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"`dirpath` must be None or a path, got {dirpath!r}.")
        self.dirpath: str | None = None if dirpath is None else os.fspath(dirpath)
        self.snapshot_dtype = parse_dtype("snapshot_dtype", snapshot_dtype)
        self.file_format = resolve_file_format(file_format)
        self.evaluate_sigma_rel: float | None = None
        if isinstance(evaluate, str):
            parent_evaluate = check_choice("evaluate", evaluate, ("raw", "ema", "both"))
        elif (
            isinstance(evaluate, numbers.Real) and not isinstance(evaluate, bool) and float(evaluate) in self.sigma_rels
        ):
            parent_evaluate, self.evaluate_sigma_rel = "raw", float(evaluate)
        else:
            raise ValueError(
                f"`evaluate` must be 'raw', 'ema', 'both' or one of sigma_rels={list(self.sigma_rels)!r}, "
                f"got {evaluate!r}."
            )
        schedules = [KarrasDecay(sigma_rel=sigma) for sigma in self.sigma_rels]
        self.gammas = tuple(schedule.gamma for schedule in schedules)
        super().__init__(
            schedules,
            every_n_steps=every_n_steps,
            device=device,
            dtype=dtype,
            buffers=buffers,
            include=include,
            exclude=exclude,
            evaluate=parent_evaluate,
            nonfinite=nonfinite,
            suffix=suffix,
            distance_every_n_steps=distance_every_n_steps,
        )
        self._last_snapshot_step: int | None = None
        self._evaluation: ExitStack | None = None

    # ------------------------------------------------------------------ public state
    @property
    def last_snapshot_step(self) -> int | None:
        """The optimizer step of the last snapshot written (or of the step training started from); ``None`` before."""
        return self._last_snapshot_step

    def snapshot_dir(self, trainer: pl.Trainer | None = None) -> Path:
        """The snapshot folder: ``dirpath``, or ``<default_root_dir>/posthoc_ema`` of ``trainer``.

        Raises:
            ValueError: if ``dirpath`` is ``None`` and no Trainer is given or known yet.
        """
        if self.dirpath is not None:
            return Path(self.dirpath)
        if trainer is None:
            raise ValueError("`trainer` must be given to resolve the default snapshot folder, got None.")
        return Path(trainer.default_root_dir) / "posthoc_ema"

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fix the snapshot folder (the same on every rank) and refuse a second swapping EMA callback."""
        super().setup(trainer, pl_module, stage)
        if self.dirpath is None:
            self.dirpath = str(trainer.strategy.broadcast(str(self.snapshot_dir(trainer))))
        if self.evaluate_sigma_rel is None:
            return
        others = [
            callback
            for callback in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(callback, EMACallback)
            and callback is not self
            and (callback.evaluate != "raw" or getattr(callback, "evaluate_sigma_rel", None) is not None)
        ]
        if others:
            raise ValueError(
                f"PostHocEMA(evaluate={self.evaluate_sigma_rel!r}) and {len(others)} other EMA callbacks would each "
                "put their EMA into the model for evaluation; their swaps cannot nest. Set `evaluate='raw'` on the "
                "others."
            )
        if getattr(pl_module, "ema_evaluates_own_average", False):  # e.g. a MeanTeacherModule evaluating its teacher
            raise ValueError(
                f"{type(pl_module).__name__} evaluates its teacher, and "
                f"PostHocEMA(evaluate={self.evaluate_sigma_rel!r}) would put its EMA over it. Choose one: "
                "`evaluate='raw'` here, or the module's `evaluate='student'`."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continue the snapshot sequence from the step training starts at; move later snapshots aside."""
        super().on_train_start(trainer, pl_module)
        step = trainer.global_step
        if self._last_snapshot_step is None or self._last_snapshot_step > step:
            self._last_snapshot_step = step
        self._supersede_after(step, trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the EMAs; after an update that reaches a multiple of ``snapshot_every_n_steps``, snapshot them."""
        updates = self.num_updates
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, every = trainer.global_step, self.snapshot_every_n_steps
        last = self._last_snapshot_step if self._last_snapshot_step is not None else 0
        # the EMAs are as of `step` only right after an update; a deferred snapshot waits for the next one
        if self.num_updates == updates or step // every <= last // every:
            return
        self._write_snapshot(trainer, pl_module, step)
        self._last_snapshot_step = step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say how many final steps no snapshot covers."""
        super().on_train_end(trainer, pl_module)
        last = self._last_snapshot_step
        if last is not None and trainer.global_step > last:
            rank_zero_info(
                f"PostHocEMA: the last snapshot is of step {last}; the {trainer.global_step - last} steps after it are "
                "in no snapshot. Make max_steps a multiple of snapshot_every_n_steps to synthesise the final EMA."
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the chosen tracked EMA in for validation if ``evaluate`` is a ``sigma_rel``."""
        super().on_validation_start(trainer, pl_module)
        self._swap_in(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back before checkpoint callbacks run."""
        self._swap_out()
        super().on_validation_end(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the chosen tracked EMA in for testing if ``evaluate`` is a ``sigma_rel``."""
        super().on_test_start(trainer, pl_module)
        self._swap_in(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._swap_out()
        super().on_test_end(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the chosen tracked EMA in for prediction if ``evaluate`` is a ``sigma_rel``."""
        super().on_predict_start(trainer, pl_module)
        self._swap_in(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._swap_out()
        super().on_predict_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put the raw weights back, whatever was swapped in."""
        try:
            self._swap_out()
        finally:
            super().on_exception(trainer, pl_module, exception)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Return the EMAs and counters of ``EMACallback`` and the step of the last snapshot."""
        state = super().state_dict()
        if state:
            state[_STATE] = {
                "sigma_rels": list(self.sigma_rels),
                "snapshot_every_n_steps": self.snapshot_every_n_steps,
                "last_snapshot_step": self._last_snapshot_step,
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the EMAs and the snapshot position; refuse EMAs tracked for other widths."""
        posthoc = state_dict.get(_STATE)
        if not isinstance(posthoc, dict):
            # e.g. the state of a plain EMACallback, adopted because it was the checkpoint's only EMA
            rank_zero_warn(
                "The checkpoint's EMA state was not written by PostHocEMA; the power-function EMAs start from the "
                "loaded weights.",
                category=UserWarning,
            )
            return
        saved = tuple(float(sigma) for sigma in posthoc.get("sigma_rels", ()))
        if saved != self.sigma_rels:
            raise ValueError(
                f"The checkpoint's PostHocEMA tracked sigma_rels={list(saved)!r}, this one `sigma_rels`="
                f"{list(self.sigma_rels)!r}: continuing those EMAs with other decays would break their profiles. "
                "Resume with the same sigma_rels, or train into a new dirpath without ckpt_path."
            )
        super().load_state_dict({key: value for key, value in state_dict.items() if key != _STATE})
        last = posthoc.get("last_snapshot_step")
        self._last_snapshot_step = None if last is None else int(last)

    # ------------------------------------------------------------------ the sweep
    def sweep(
        self,
        trainer: pl.Trainer,
        model: pl.LightningModule,
        sigma_rels: Iterable[float],
        *,
        datamodule: pl.LightningDataModule | None = None,
        dataloaders: Any = None,
        step: int | None = None,
        max_error: float | None = DEFAULT_MAX_ERROR,
    ) -> dict[float, dict[str, float]]:
        """Validate the EMA synthesised for each ``sigma_rel`` from this callback's snapshots; see :func:`sweep`."""
        return sweep(
            trainer,
            model,
            sigma_rels,
            dirpath=self.snapshot_dir(trainer),
            datamodule=datamodule,
            dataloaders=dataloaders,
            step=step,
            max_error=max_error,
        )

    # ------------------------------------------------------------------ internals
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.evaluate_sigma_rel is not None:
            self._swap_out()
            stack = ExitStack()
            stack.enter_context(self.swapped(pl_module, self.sigma_rels.index(self.evaluate_sigma_rel)))
            self._evaluation = stack

    def _swap_out(self) -> None:
        stack, self._evaluation = self._evaluation, None
        if stack is not None:
            stack.close()

    def _write_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        regions = shard_regions(pl_module)
        if regions is None and not trainer.is_global_zero:
            return  # DDP: every rank holds the same EMAs; rank 0 writes them
        rank = None if regions is None else trainer.global_rank
        world_size = None if regions is None else trainer.world_size
        emas, shards = snapshot_tensors(
            self.ema_state_dict, len(self.sigma_rels), regions=regions, rank=rank, snapshot_dtype=self.snapshot_dtype
        )
        file_format = self.file_format
        path = self.snapshot_dir(trainer) / snapshot_filename(
            step, rank=rank, world_size=world_size, file_format=file_format
        )
        write_snapshot(
            path,
            step=step,
            sigma_rels=self.sigma_rels,
            gammas=self.gammas,
            emas=emas,
            shards=shards,
            rank=rank,
            world_size=world_size,
        )

    def _supersede_after(self, step: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the snapshots of steps after ``step`` that this rank is responsible for into ``superseded/``."""
        folder = self.snapshot_dir(trainer)
        if not folder.is_dir():
            return
        sharded = shard_regions(pl_module) is not None
        rank = trainer.global_rank
        if not sharded and not trainer.is_global_zero:
            return
        moved = supersede_after(folder, step, rank=rank, world_size=trainer.world_size, sharded=sharded)
        if not moved or rank != 0:
            return
        message = (
            f"PostHocEMA: moved {len(moved)} snapshot files of steps after {step} to {str(folder / SUPERSEDED)!r} "
            f"({moved[0]}{' ...' if len(moved) > 1 else ''}), so that synthesis reads this run's snapshots only."
        )
        if step == 0:
            rank_zero_warn(f"{message} They are from an earlier run in the same folder.", category=UserWarning)
        else:
            rank_zero_info(f"{message} They were written after the checkpoint being resumed.")
