"""Continuing a run of Lightning's ``EMAWeightAveraging`` with an EMA callback (``fit(ckpt_path=...)``).

That callback saves its average in ``checkpoint["state_dict"]`` and the raw weights in ``current_model_state``, and
no state an EMA callback recognises. :func:`take_lightning_average` puts the raw weights back into the module and
turns the average and its counters into an EMA state of lightning-ema's layout, which the run then loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_ema._init_from import match_names
from lightning_ema._selection import select
from lightning_ema._state_validation import FORMAT, VERSION
from lightning_ema.ema import EMAConfig

__all__ = ["take_lightning_average"]


def take_lightning_average(module: pl.LightningModule, checkpoint: dict[str, Any], config: EMAConfig) -> dict[str, Any]:
    """Put an ``EMAWeightAveraging`` checkpoint's raw weights into ``module``; return its average as an EMA state.

    Lightning has loaded ``checkpoint["state_dict"]``, which that callback fills with the average, into the
    module; the raw weights are in ``current_model_state``. Every EMA of ``config`` starts from the average.
    """
    module.load_state_dict(checkpoint["current_model_state"])
    weights = match_names(checkpoint["state_dict"], tracked_names(module, config))
    averaged = (checkpoint.get("averaging_state") or {}).get("n_averaged")
    num_updates = int(averaged.item()) if isinstance(averaged, Tensor) and averaged.numel() == 1 else 0
    step = int(checkpoint.get("global_step") or 0)
    latest = [
        state["latest_update_step"]
        for state in (checkpoint.get("callbacks") or {}).values()
        if isinstance(state, Mapping) and isinstance(state.get("latest_update_step"), int)
    ]
    last = min(latest[0], step) if latest else step
    rank_zero_info(
        "EMACallback: the checkpoint was written by Lightning's EMAWeightAveraging; the module gets the raw "
        "weights from `current_model_state` and the EMA starts from its average (`state_dict`)."
    )
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config.describe(),
        "num_updates": num_updates,
        "last_update_step": last,
        "step": step,
        "emas": [dict(weights) for _ in config.schedules],
    }


def tracked_names(module: nn.Module, config: EMAConfig) -> list[str]:
    """The ``state_dict`` names an EMA with ``config`` tracks in ``module`` (no tensor is allocated)."""
    selected = select(
        module,
        include=config.include,
        exclude=config.exclude,
        buffers=config.buffers,
        integer_buffers=config.integer_buffers,
    )
    return [name for item in selected for name in item.names]
