"""``PostHocEMA``: power-function EMAs snapshotted during training, and a sweep over synthesised EMA lengths.

The callback is an :class:`~lightning_ema.EMACallback` with one ``KarrasDecay`` per ``sigma_rel`` (all updated in one
pass over the weights) that saves snapshots of its EMAs every ``snapshot_every_n_steps`` optimizer steps. Its hooks
delegate: the math and the file format live in :mod:`lightning_ema.posthoc`; its argument checks in
``_posthoc_arguments``; what a rank writes and a resumed run moves aside in ``_posthoc_writing``; where the snapshot
sequence stands in ``_posthoc_sequence``; evaluating one tracked EMA in ``_posthoc_evaluation``; :func:`sweep`
(re-exported here) in ``_posthoc_sweep``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_ema._posthoc_arguments import (
    check_dirpath,
    check_evaluate,
    check_sigma_rels,
    check_snapshot_every,
    resolve_file_format,
)
from lightning_ema._posthoc_evaluation import HeldSwap, refuse_other_swaps
from lightning_ema._posthoc_sequence import STATE_KEY, SnapshotSequence, saved_sequence
from lightning_ema._posthoc_sweep import sweep
from lightning_ema._posthoc_writing import write_rank_snapshot
from lightning_ema._validate import check_int, parse_dtype
from lightning_ema.callback import EMACallback
from lightning_ema.ema import BufferPolicy, NonFinitePolicy
from lightning_ema.posthoc import DEFAULT_MAX_ERROR
from lightning_ema.schedules import KarrasDecay

__all__ = ["PostHocEMA", "sweep"]


class PostHocEMA(EMACallback):
    """Track power-function EMAs and snapshot them, so that any EMA length can be synthesised after training.

    Post-hoc EMA of Karras et al. 2024 (EDM2, §3 and Appendix C): one EMA per ``sigma_rel`` with the decay
    ``KarrasDecay(sigma_rel=...)``, all updated in one pass over the weights, and every ``snapshot_every_n_steps``
    optimizer steps a snapshot of all of them in ``dirpath``. After training,
    :func:`lightning_ema.posthoc.synthesize` turns the snapshots into the EMA of any ``sigma_rel`` (best between
    and near the tracked ones), and :meth:`sweep` validates a list of them with a Trainer.

    Snapshots are written atomically (``step-0000001000.safetensors``, or ``.pt`` readable with
    ``torch.load(weights_only=True)``), under DDP by rank 0, under FSDP2 by every rank for its own shards, with
    nothing gathered. ``trainer.fit(ckpt_path=...)`` continues the sequence without a gap or a duplicate; snapshots
    after the step a run starts from (an interrupted run's after its last checkpoint, or an earlier run's in the same
    folder) are moved to ``dirpath/superseded``, where synthesis does not read them.

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
        evaluate: what validation, test and predict run with: ``"raw"`` (default: the raw weights), one of
            ``sigma_rels`` (that EMA swapped in), or ``"ema"``/``"both"`` as for ``EMACallback`` (every tracked EMA,
            each under its suffix ``_ema0``, ``_ema1``, ...).
        device, dtype, buffers, include, exclude, nonfinite, suffix, distance_every_n_steps: as for
            :class:`~lightning_ema.EMACallback`.

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
        self.snapshot_every_n_steps = check_snapshot_every(snapshot_every_n_steps, every_n_steps)
        self.dirpath: str | None = check_dirpath(dirpath)
        self.snapshot_dtype = parse_dtype("snapshot_dtype", snapshot_dtype)
        self.file_format = resolve_file_format(file_format)
        parent_evaluate, self.evaluate_sigma_rel = check_evaluate(evaluate, self.sigma_rels)
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
        self._snapshots = SnapshotSequence()
        self._evaluation = HeldSwap()

    # ------------------------------------------------------------------ public state
    @property
    def last_snapshot_step(self) -> int | None:
        """The optimizer step of the last snapshot written (or of the step training started from); ``None`` before."""
        return self._snapshots.last_step

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

    # ------------------------------------------------------------------ training hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fix the snapshot folder (the same on every rank) and refuse a second swapping EMA callback."""
        super().setup(trainer, pl_module, stage)
        if self.dirpath is None:
            self.dirpath = str(trainer.strategy.broadcast(str(self.snapshot_dir(trainer))))
        if self.evaluate_sigma_rel is not None:
            refuse_other_swaps(self, self.evaluate_sigma_rel, trainer.callbacks, pl_module)  # type: ignore[attr-defined]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continue the snapshot sequence from the step training starts at; move later snapshots aside."""
        super().on_train_start(trainer, pl_module)
        folder = self.snapshot_dir(trainer)
        self._snapshots.start(
            trainer.global_step, folder, pl_module, rank=trainer.global_rank, world_size=trainer.world_size
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the EMAs; after an update that reaches a multiple of ``snapshot_every_n_steps``, snapshot them."""
        updates = self.num_updates
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        # the EMAs are as of `step` only right after an update; a deferred snapshot waits for the next one
        if self.num_updates == updates or not self._snapshots.due(step, self.snapshot_every_n_steps):
            return
        folder = self.snapshot_dir(trainer)
        write_rank_snapshot(self, folder, step, pl_module, rank=trainer.global_rank, world_size=trainer.world_size)
        self._snapshots.last_step = step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say how many final steps no snapshot covers."""
        super().on_train_end(trainer, pl_module)
        self._snapshots.explain_end(trainer.global_step)

    # ------------------------------------------------------------------ evaluation hooks
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the chosen tracked EMA in for validation if ``evaluate`` is a ``sigma_rel``."""
        super().on_validation_start(trainer, pl_module)
        self._swap_in(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back before checkpoint callbacks run."""
        self._evaluation.close()
        super().on_validation_end(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the chosen tracked EMA in for testing if ``evaluate`` is a ``sigma_rel``."""
        super().on_test_start(trainer, pl_module)
        self._swap_in(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._evaluation.close()
        super().on_test_end(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the chosen tracked EMA in for prediction if ``evaluate`` is a ``sigma_rel``."""
        super().on_predict_start(trainer, pl_module)
        self._swap_in(pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._evaluation.close()
        super().on_predict_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put the raw weights back, whatever was swapped in."""
        try:
            self._evaluation.close()
        finally:
            super().on_exception(trainer, pl_module, exception)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.evaluate_sigma_rel is not None:
            self._evaluation.enter(self.swapped(pl_module, self.sigma_rels.index(self.evaluate_sigma_rel)))

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """Return the EMAs and counters of ``EMACallback`` and the step of the last snapshot."""
        state = super().state_dict()
        if state:
            state[STATE_KEY] = self._snapshots.state(self.sigma_rels, self.snapshot_every_n_steps)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the EMAs and the snapshot position; refuse EMAs tracked for other widths."""
        entry = saved_sequence(state_dict, self.sigma_rels)
        if entry is None:
            return
        super().load_state_dict({key: value for key, value in state_dict.items() if key != STATE_KEY})
        self._snapshots.load(entry)

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
