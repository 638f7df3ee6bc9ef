"""``sweep``: validate a model with each of several EMAs synthesised from post-hoc EMA snapshots.

Public through :mod:`lightning_ema.posthoc_callback` (``PostHocEMA.sweep`` calls it with the callback's folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_ema._posthoc_evaluation import swaps_own_ema
from lightning_ema.posthoc import DEFAULT_MAX_ERROR, synthesis_plan, synthesize_many

__all__ = ["sweep"]


def sweep(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    sigma_rels: Iterable[float],
    *,
    dirpath: str | os.PathLike[str],
    datamodule: pl.LightningDataModule | None = None,
    dataloaders: Any = None,
    step: int | None = None,
    max_error: float | None = DEFAULT_MAX_ERROR,
) -> dict[float, dict[str, float]]:
    """Validate ``model`` with the EMA synthesised for each ``sigma_rel``: "which EMA length is best?" in one call.

    For each width (in increasing order), the synthesised EMA is loaded into ``model`` and ``trainer.validate`` runs
    once; the metrics it produced (``trainer.callback_metrics``) are collected and also logged to every logger of the
    Trainer as ``posthoc/<metric>`` together with ``posthoc/sigma_rel`` and ``posthoc/reconstruction_error``, at step
    ``i`` for the ``i``-th width. The model's own weights are restored afterwards, also on an exception. All EMAs are
    synthesised first in one pass over the snapshots (one copy of the averaged tensors per width, on the CPU).

    Args:
        trainer: the Trainer that validates (the one that trained, or a new one); none of its EMA callbacks may swap
            its own EMA in for validation (``evaluate="raw"``).
        model: the LightningModule the snapshots were taken of (unsharded).
        sigma_rels: the relative widths to evaluate.
        dirpath: the snapshot folder.
        datamodule: passed to ``trainer.validate``.
        dataloaders: passed to ``trainer.validate``.
        step: the snapshot step the EMAs are read at; ``None`` is the last one.
        max_error: passed to :func:`~lightning_ema.posthoc.synthesize`.

    Returns:
        ``{sigma_rel: {"reconstruction_error": ..., <metric>: value, ...}}``, by increasing ``sigma_rel``.

    Raises:
        ValueError: if a callback of ``trainer`` would swap its own EMA in, or for widths the snapshots cannot support.
    """
    swapping = [
        type(callback).__name__
        for callback in trainer.callbacks  # type: ignore[attr-defined]
        if swaps_own_ema(callback)
    ]
    if swapping:
        raise ValueError(
            f"`trainer` must not swap an EMA of its own in for validation, got {swapping} with evaluate other than "
            "'raw': validation would run with that EMA instead of the synthesised one. Use evaluate='raw', or a "
            "Trainer without them."
        )
    widths = sorted(dict.fromkeys(float(sigma) for sigma in sigma_rels))
    errors = {sigma: synthesis_plan(dirpath, sigma, step=step).error for sigma in widths}
    weights = synthesize_many(dirpath, widths, step=step, max_error=max_error)
    own = model.state_dict()
    unknown = sorted(set(next(iter(weights.values()))) - set(own))
    if unknown:
        raise ValueError(f"`model` must have the snapshots' tensors, got a model without {unknown[:5]}.")
    raw = {name: tensor.detach().clone() for name, tensor in own.items()}
    results: dict[float, dict[str, float]] = {}
    try:
        for position, sigma in enumerate(widths):
            model.load_state_dict(weights[sigma], strict=False)
            trainer.validate(model, dataloaders=dataloaders, datamodule=datamodule, verbose=False)
            metrics = {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1)
            }
            results[sigma] = {"reconstruction_error": errors[sigma], **metrics}
            logged = {f"posthoc/{name}": value for name, value in results[sigma].items()}
            logged["posthoc/sigma_rel"] = sigma
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=position)
    finally:
        model.load_state_dict(raw)
    for logger in trainer.loggers:
        logger.save()
    return results
