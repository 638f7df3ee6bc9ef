"""What an EMA callback logs while training: each EMA's ``ema/decay`` and ``ema/distance``, and on which steps.

Each EMA logs under its own tag: ``ema/decay`` for a single EMA, ``ema/decay/0.999`` (a constant decay) or
``ema/decay/1`` (its position) for several, with the callback's position in front when a Trainer has several EMA
callbacks (``ema/decay/1/0.999``). ``self.log`` costs about half a millisecond, so nothing is logged on the steps
the Trainer's loggers do not write; a distance that falls due in between is logged at the next step they write.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_ema.ema import EMA
from lightning_ema.schedules import ConstantDecay, DecaySchedule

__all__ = ["TrainingLog", "label"]


class TrainingLog:
    """The training metrics of an EMA callback's EMAs: their names, and whether a distance is due.

    Args:
        schedules: one schedule per EMA, in the order ``decay`` gave them.
    """

    def __init__(self, schedules: Sequence[DecaySchedule]) -> None:
        self.schedules = tuple(schedules)
        self.tags = self._tags_for(position=None)
        #: Whether an update since the last logged distance reached a multiple of ``distance_every_n_steps``.
        self.distance_due = False

    def place(self, position: int | None) -> None:
        """Name the metrics for the callback's place among several EMA callbacks of the Trainer (``None`` if alone)."""
        self.tags = self._tags_for(position)

    def updated(self, previous: int, step: int, every: int) -> None:
        """Note an update at ``step`` after the one at ``previous``; ``every``: ``distance_every_n_steps``."""
        if every and step // every > previous // every:
            self.distance_due = True  # a multiple of `every` lies in (previous, step]

    def write(self, trainer: pl.Trainer, module: pl.LightningModule, ema: EMA) -> None:
        """Log each EMA's last decay, and its distance if one is due, if the loggers write this step."""
        if not ema.last_decays or not _loggers_write_now(trainer):
            return
        for tag, decay in zip(self.tags, ema.last_decays, strict=True):
            module.log(f"ema/decay{tag}", decay, on_step=True, on_epoch=False, batch_size=1)
        if self.distance_due:
            self.distance_due = False
            distances = ema.relative_distances()  # empty if nothing is averaged (every tensor copied)
            for tag, distance in zip(self.tags if distances else (), distances, strict=True):
                module.log(f"ema/distance{tag}", distance, on_step=True, on_epoch=False, batch_size=1)

    def _tags_for(self, position: int | None) -> list[str]:
        """Log-key tags, one per EMA: ``ema/decay``, ``ema/decay/0.999``, ``ema/decay/1`` or ``ema/decay/1/0.999``."""
        prefix = "" if position is None else f"/{position}"
        if len(self.schedules) == 1:
            return [prefix]
        return [f"{prefix}/{label(schedule, index)}" for index, schedule in enumerate(self.schedules)]


def label(schedule: DecaySchedule, index: int) -> str:
    """Name an EMA by its decay if it is constant (``0.999``), else by its position."""
    return repr(schedule.decay) if isinstance(schedule, ConstantDecay) else str(index)


def _loggers_write_now(trainer: pl.Trainer) -> bool:
    """Whether the Trainer's loggers will write this training batch's step metrics.

    Evaluated in ``on_train_batch_end``, Lightning's own ``should_update_logs`` gives the answer it will use a moment
    later, when it writes the step metrics (its step counter advances only after that).
    """
    if not trainer.loggers:
        return False
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(connector.should_update_logs) or bool(getattr(trainer, "fast_dev_run", False))
