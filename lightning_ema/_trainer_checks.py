"""What an EMA callback checks of the Trainer it joins, in ``setup`` before the model is touched.

- It refuses strategies whose parameters the EMA cannot follow (FSDP1, DeepSpeed), and evaluations that would need
  two averages swapped into the module at once.
- It points out ``ModelCheckpoint(save_weights_only=True)``, whose checkpoints hold no EMA.
- It finds its siblings: several EMA callbacks may share a Trainer, each under its own ``state_key``.
"""

from __future__ import annotations

from typing import TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["callbacks_of", "refuse_conflicting_swaps", "refuse_unsupported_strategy", "saves_weights_only"]

_CallbackT = TypeVar("_CallbackT", bound=Callback)


def refuse_unsupported_strategy(strategy: object) -> None:
    """Raise for strategies that hide or re-partition parameters behind the module's back.

    FSDP1 flattens parameters into shards that change between forward and backward, and DeepSpeed ZeRO
    partitions them inside its engine; an EMA of the module's ``state_dict`` tensors would average the wrong
    thing. Neither runs on CPU, so neither can be tested here: refusing is better than being silently wrong.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"EMACallback does not support `strategy={type(strategy).__name__}`: the EMA would not follow its "
            "flattened or partitioned parameters. Use `ModelParallelStrategy` with `fully_shard` in "
            "`configure_model` (FSDP2) or a DDP strategy instead."
        )


def refuse_conflicting_swaps(evaluate: str, siblings: list[str], module: pl.LightningModule) -> None:
    """Raise if evaluation would need two averages swapped into the module at once (their swaps cannot nest).

    Args:
        evaluate: this callback's ``evaluate``.
        siblings: the ``evaluate`` of every EMA callback of the Trainer, this one included.
        module: the LightningModule being set up.
    """
    if evaluate != "raw" and getattr(module, "ema_evaluates_own_average", False):
        raise ValueError(
            f"{type(module).__name__} evaluates its teacher (an average of its own), and "
            f"EMACallback(evaluate={evaluate!r}) would put its EMA over it. Choose one: "
            "`EMACallback(evaluate='raw')`, or the module's `evaluate='student'` to evaluate the callback's EMA."
        )
    swapping = [sibling for sibling in siblings if sibling != "raw"]
    if len(swapping) > 1:
        raise ValueError(
            f"{len(swapping)} EMACallbacks would each put their EMA into the model for evaluation "
            f"(evaluate={swapping!r}); their swaps cannot nest. Set `evaluate='raw'` on all but one of them."
        )


def saves_weights_only(trainer: pl.Trainer) -> bool:
    """Whether a ``ModelCheckpoint`` of ``trainer`` writes checkpoints without callback states (so without an EMA)."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    return any(isinstance(c, ModelCheckpoint) and c.save_weights_only for c in callbacks)


def callbacks_of(trainer: pl.Trainer, kind: type[_CallbackT]) -> list[_CallbackT]:
    """The callbacks of ``trainer`` that are instances of ``kind``, in the Trainer's order."""
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    return [callback for callback in callbacks if isinstance(callback, kind)]
