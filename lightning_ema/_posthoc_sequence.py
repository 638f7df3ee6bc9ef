"""Where a ``PostHocEMA``'s sequence of snapshots stands, and how a run continues it.

A run continues the sequence from the step it starts at: the snapshots of later steps (an interrupted run's after
its last checkpoint, or an earlier run's in the same folder) are moved into ``superseded/``. A snapshot is due right
after an EMA update that reaches a new multiple of ``snapshot_every_n_steps``. The step of the last snapshot is
saved with the callback's state, so that ``trainer.fit(ckpt_path=...)`` continues without a gap or a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_ema._posthoc_writing import shard_regions, supersede_after
from lightning_ema._snapshots import SUPERSEDED

__all__ = ["STATE_KEY", "SnapshotSequence", "saved_sequence"]

#: The key of the sequence's entry in ``PostHocEMA``'s callback state, beside ``EMACallback``'s.
STATE_KEY = "posthoc"


class SnapshotSequence:
    """The step of the last snapshot, and the decisions that continue the sequence from it.

    Attributes:
        last_step: the optimizer step of the last snapshot written (or of the step training started from);
            ``None`` before either.
    """

    def __init__(self) -> None:
        self.last_step: int | None = None

    def start(self, step: int, folder: Path, module: nn.Module, *, rank: int, world_size: int) -> None:
        """Continue the sequence from ``step``, where training starts; move the snapshots of later steps aside."""
        if self.last_step is None or self.last_step > step:
            self.last_step = step
        _supersede_later(step, folder, module, rank=rank, world_size=world_size)

    def due(self, step: int, every: int) -> bool:
        """Whether a snapshot at ``step`` (right after an EMA update) reaches a new multiple of ``every``."""
        last = self.last_step if self.last_step is not None else 0
        return step // every > last // every

    def explain_end(self, step: int) -> None:
        """Say how many final steps, up to ``step`` where training ended, no snapshot covers."""
        last = self.last_step
        if last is not None and step > last:
            rank_zero_info(
                f"PostHocEMA: the last snapshot is of step {last}; the {step - last} steps after it are "
                "in no snapshot. Make max_steps a multiple of snapshot_every_n_steps to synthesise the final EMA."
            )

    def state(self, sigma_rels: Sequence[float], every: int) -> dict[str, Any]:
        """The sequence's entry in the callback state (plain values)."""
        return {"sigma_rels": list(sigma_rels), "snapshot_every_n_steps": every, "last_snapshot_step": self.last_step}

    def load(self, entry: Mapping[str, Any]) -> None:
        """Continue from the step of the last snapshot saved in ``entry`` (see :func:`saved_sequence`)."""
        last = entry.get("last_snapshot_step")
        self.last_step = None if last is None else int(last)


def saved_sequence(state_dict: Mapping[str, Any], sigma_rels: Sequence[float]) -> Mapping[str, Any] | None:
    """Return the sequence's entry of a callback state, or ``None`` (with a warning) if ``PostHocEMA`` did not write it.

    Raises:
        ValueError: if the entry's EMAs were tracked for other ``sigma_rels``.
    """
    entry = state_dict.get(STATE_KEY)
    if not isinstance(entry, dict):
        # e.g. the state of a plain EMACallback, adopted because it was the checkpoint's only EMA
        rank_zero_warn(
            "The checkpoint's EMA state was not written by PostHocEMA; the power-function EMAs start from the "
            "loaded weights.",
            category=UserWarning,
        )
        return None
    saved = tuple(float(sigma) for sigma in entry.get("sigma_rels", ()))
    if saved != tuple(sigma_rels):
        raise ValueError(
            f"The checkpoint's PostHocEMA tracked sigma_rels={list(saved)!r}, this one `sigma_rels`="
            f"{list(sigma_rels)!r}: continuing those EMAs with other decays would break their profiles. "
            "Resume with the same sigma_rels, or train into a new dirpath without ckpt_path."
        )
    return entry


def _supersede_later(step: int, folder: Path, module: nn.Module, *, rank: int, world_size: int) -> None:
    """Move the snapshots of steps after ``step`` that this rank is responsible for into ``superseded/``."""
    if not folder.is_dir():
        return
    sharded = shard_regions(module) is not None
    if not sharded and rank != 0:
        return
    moved = supersede_after(folder, step, rank=rank, world_size=world_size, sharded=sharded)
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
