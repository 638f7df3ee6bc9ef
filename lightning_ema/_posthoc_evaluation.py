"""Evaluating with one of ``PostHocEMA``'s tracked EMAs, and the rule that only one average is swapped in at a time.

``PostHocEMA(evaluate=<sigma_rel>)`` holds that EMA's swap from an evaluation's start to its end (or an exception);
it and :func:`~lightning_ema.posthoc_callback.sweep` refuse a Trainer in which another average would be swapped into
the module as well, since swaps cannot nest.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, ExitStack

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_ema.callback import EMACallback

__all__ = ["HeldSwap", "refuse_other_swaps", "swaps_own_ema"]


def swaps_own_ema(callback: Callback) -> bool:
    """Whether ``callback`` is an EMA callback that puts an EMA of its own into the module for evaluation."""
    return isinstance(callback, EMACallback) and (
        callback.evaluate != "raw" or getattr(callback, "evaluate_sigma_rel", None) is not None
    )


def refuse_other_swaps(
    callback: EMACallback, sigma_rel: float, callbacks: Iterable[Callback], module: pl.LightningModule
) -> None:
    """Raise if an EMA callback among ``callbacks`` or ``module`` itself would swap an average in besides ``callback``.

    Args:
        callback: the ``PostHocEMA`` that evaluates its EMA of width ``sigma_rel``.
        sigma_rel: the width it evaluates, for the message.
        callbacks: the Trainer's callbacks.
        module: the LightningModule evaluated.
    """
    others = [other for other in callbacks if other is not callback and swaps_own_ema(other)]
    if others:
        raise ValueError(
            f"PostHocEMA(evaluate={sigma_rel!r}) and {len(others)} other EMA callbacks would each "
            "put their EMA into the model for evaluation; their swaps cannot nest. Set `evaluate='raw'` on the "
            "others."
        )
    if getattr(module, "ema_evaluates_own_average", False):  # e.g. a MeanTeacherModule evaluating its teacher
        raise ValueError(
            f"{type(module).__name__} evaluates its teacher, and "
            f"PostHocEMA(evaluate={sigma_rel!r}) would put its EMA over it. Choose one: "
            "`evaluate='raw'` here, or the module's `evaluate='student'`."
        )


class HeldSwap:
    """One swap held open from an evaluation's start to its end; closing it puts the raw weights back."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None

    def enter(self, swap: AbstractContextManager[object]) -> None:
        """Close the swap held (if any), then enter ``swap`` and hold it until :meth:`close`."""
        self.close()
        stack = ExitStack()
        stack.enter_context(swap)
        self._stack = stack

    def close(self) -> None:
        """Leave the swap held, if any."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
