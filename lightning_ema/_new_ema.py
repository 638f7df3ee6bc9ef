"""How a new EMA starts: from the weights, or from ``init_from``.

- ``init_from`` is checked when the callback is made (:func:`check_init_from`) and applied when ``fit`` starts a
  new EMA (:func:`start_from`); :mod:`lightning_ema._init_from` reads its tensors and matches their names.
- An EMA started from the weights is checked against the run's length (:func:`warn_if_stale`): a decay too slow
  for it leaves the EMA at the end of ``fit`` mostly the initial weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ema._init_from import initial_ema, match_names
from lightning_ema.ema import EMA, EMAConfig

__all__ = ["InitFrom", "check_init_from", "start_from", "warn_if_stale"]

#: Above this share of the initial weights left in the EMA at the end of ``fit``, the callback warns.
_STALE_SHARE = 0.5

InitFrom = str | os.PathLike[str] | Mapping[str, Any] | None


def check_init_from(value: Any) -> InitFrom:
    """Return ``init_from`` if it is ``None``, a mapping or the path of an existing file or folder."""
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, (str, os.PathLike)) and Path(value).exists():
        return value
    raise ValueError(
        "`init_from` must be None, a checkpoint or state dict, or the path of an existing checkpoint file, "
        f"got {value!r}."
    )


def start_from(ema: EMA, source: str | os.PathLike[str] | Mapping[str, Any], step: int) -> None:
    """Replace a new EMA's tensors by those of ``source`` (any readable layout); buffers it lacks stay as they are."""
    current = {k: ema.ema_state_dict(k) for k in range(ema.num_emas)}
    buffers = set(ema.module.state_dict()) - {name for name, _ in ema.module.named_parameters(remove_duplicate=False)}
    weights = match_names(initial_ema(source, ema.module), list(current[0]), optional=sorted(buffers))
    emas = [{name: weights.get(name, tensor) for name, tensor in current[k].items()} for k in range(ema.num_emas)]
    ema.load_state_dict({"num_updates": 0, "last_update_step": step, "step": step, "emas": emas})


def warn_if_stale(trainer: pl.Trainer, config: EMAConfig) -> None:
    """Warn if, at the end of this run, the EMA would still be mostly the weights it starts from."""
    total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    if total is None:
        try:
            estimated = trainer.estimated_stepping_batches
        except Exception:  # no estimate (an iterable without length): nothing to warn about
            return
        if not math.isfinite(estimated):
            return
        total = int(estimated)
    shares = config.policy.share_left(trainer.global_step, total)
    for schedule, share in zip(config.schedules, shares or (), strict=False):
        if share > _STALE_SHARE:
            rank_zero_warn(
                f"EMACallback: with {schedule!r}, the EMA at the end of this run ({total} optimizer steps) is "
                f"still {share:.0%} the initial weights, so evaluating and saving it mostly shows untrained "
                "weights. Use a smaller decay (time constant 1/(1-decay) well below the run's length) or a "
                "warm-up schedule such as `WarmupDecay`.",
                category=UserWarning,
            )
            return
