"""``EMAHolder``, the base of ``EMACallback``: the EMA a callback holds across runs, and its checkpoint state.

Which EMA a run uses is :mod:`lightning_ema._lifecycle`'s rule; this class gives it the hooks where the EMA is
made or taken (training start, a lazy module's first step), re-paired and synchronised, and the callback's part
of a Lightning checkpoint: ``state_key``, ``state_dict``/``load_state_dict`` and the save and load hooks. Read
access to the EMA is here too. What the callback does with the EMA (update, log, evaluate) is in
:mod:`lightning_ema.callback`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ema._lifecycle import EMALifecycle
from lightning_ema._lightning_average import take_lightning_average
from lightning_ema._new_ema import InitFrom
from lightning_ema._saving import complete_checkpoint
from lightning_ema._state_validation import check_ema_state
from lightning_ema._trainer_checks import callbacks_of
from lightning_ema.checkpoint import FORMAT, VERSION, config_changes, ema_states, find_state_key, load_sharded_ema
from lightning_ema.ema import EMA, EMAConfig
from lightning_ema.schedules import DecaySchedule

__all__ = ["EMAHolder"]


class EMAHolder(Callback):
    """A callback that holds an EMA of the module it trains, across Trainer runs and in checkpoints.

    The base of :class:`~lightning_ema.EMACallback`, which documents the behaviour; it is not used on its own.

    Args:
        config: the validated EMA settings.
        init_from: a checkpoint or state dict a new EMA starts from (checked by ``check_init_from``).
    """

    def __init__(self, config: EMAConfig, init_from: InitFrom) -> None:
        self._ema_config = config
        self.init_from = init_from
        self._life = EMALifecycle(config, init_from)
        self._refresh_due = False  # an epoch started: re-pair the EMA before its first batch

    # ------------------------------------------------------------------ public state
    @property
    def schedule(self) -> DecaySchedule:
        """The decay schedule (a float ``decay`` becomes a ``ConstantDecay``); the first one if several."""
        return self._ema_config.schedules[0]

    @property
    def schedules(self) -> tuple[DecaySchedule, ...]:
        """One schedule per EMA, in the order ``decay`` gave them."""
        return self._ema_config.schedules

    @property
    def ema(self) -> EMA | None:
        """The :class:`~lightning_ema.EMA` this callback drives (``None`` before ``fit`` or a checkpoint made one)."""
        return self._life.ema

    @property
    def _several(self) -> bool:
        return len(self._ema_config.schedules) > 1

    @property
    def num_updates(self) -> int:
        """How many times the EMA was updated (copies during ``start_step`` included)."""
        return self._life.num_updates()

    def ema_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Return the EMA tensors under the LightningModule's ``state_dict`` names.

        The tensors are the live averages, not copies: clone them to keep a snapshot. Tensors the EMA
        does not track (``include``/``exclude``, ``buffers="ignore"``) are absent.

        Args:
            index: which EMA, by position in ``decay``, when there are several.

        Raises:
            RuntimeError: if no EMA exists yet (it is created when ``fit`` starts).
        """
        return self._life.ema_state_dict(index)

    @contextmanager
    def swapped(self, pl_module: pl.LightningModule, index: int = 0) -> Iterator[pl.LightningModule]:
        """Context in which ``pl_module`` holds the EMA weights (EMA ``index``); the raw weights return on exit.

        The raw weights come back bit-exactly, also when the block raises. Checkpoints written by
        ``trainer.save_checkpoint`` inside the block still store the raw weights in ``"state_dict"``
        (except with ``weights_only=True``, where Lightning runs no callback hook).

        Raises:
            RuntimeError: if this callback holds no EMA of ``pl_module``.
        """
        ema = self._life.for_module(pl_module)
        if ema is None:
            raise RuntimeError(
                "This EMACallback holds no EMA of the given module: an EMA is created when `fit` starts, for the "
                "module that `fit` trains (or loaded by `trainer.validate/test/predict(ckpt_path=...)` for the module "
                "evaluated). For a checkpoint's EMA, use `load_ema_state_dict(path)` or evaluate with `ckpt_path=`."
            )
        ema.refresh()
        with ema.swapped(index):
            yield pl_module

    @property
    @override
    def state_key(self) -> str:
        decays = [repr(schedule) for schedule in self.schedules]
        config = self._ema_config
        return self._generate_state_key(
            # a single decay keeps the key it had before several decays existed, so old checkpoints match
            decay=decays if self._several else decays[0],
            include=config.include,
            exclude=config.exclude,
        )

    def _config(self) -> dict[str, Any]:
        return self._ema_config.describe()

    # ------------------------------------------------------------------ the EMA during training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the EMA from the model (or take the checkpoint's, when resuming) before the first step."""
        self._life.resolve(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note that the EMA re-pairs before the epoch's first batch, once every callback's epoch start has run."""
        self._refresh_due = True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """At an epoch's first batch, re-pair the EMA by name with tensors replaced since the last check.

        Not in ``on_train_epoch_start``: a callback after this one may replace tensors there (SWA puts new BatchNorm
        statistics into the module when its last epoch starts), and this epoch's updates must read the new ones.
        """
        ema = self._life.bound
        if self._refresh_due and ema is not None:
            ema.refresh()
        self._refresh_due = False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Create the EMA of a lazy module once its first forward has materialised it, before its first step."""
        self._life.create_lazily(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give every rank rank 0's buffer EMA, so that what follows training (export, test) agrees across ranks."""
        ema = self._life.bound
        if ema is not None:
            ema.take_rank_zero_buffers()

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the raw weights in ``checkpoint["state_dict"]``; store sharded EMA where every rank's shard is saved."""
        ema = self._life.bound
        if ema is not None and ema.module is pl_module:
            complete_checkpoint(ema, self.state_key, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Return the EMA, its counters and a configuration fingerprint (tensors and plain values only)."""
        ema = self._life.ema
        if ema is None:
            pending = self._life.saved_state()
            return dict(pending) if pending else {}
        state = {"format": FORMAT, "version": VERSION, "config": self._config(), **ema.state_dict()}
        state.pop("shard", None)  # the callback stores shards itself, every rank's in the checkpoint
        sharded = ema.sharding
        if sharded:
            # Local shards must not reach rank 0's file; on_save_checkpoint stores them where every rank's go.
            state["emas"] = [{n: t for n, t in ema.items() if n not in sharded} for ema in state["emas"]]
            state["sharded"] = sorted(sharded)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a saved EMA for this run: its layout is checked now, its tensors and their fit when it is applied."""
        # --- issue 13: one validation of every EMA state (the layout here, the tensors in EMA.load_state_dict) ---
        state_dict = check_ema_state(state_dict, state_key=self.state_key, tensors=False)
        saved = state_dict["config"]  # version 1's single "decay" is already under "decays"
        details = config_changes(saved, self._config())
        if details:
            fitting = self._life.run.fn in ("", "fit")
            verb, outcome = ("Resuming", "continues") if fitting else ("Loading", "is used")
            rank_zero_warn(
                f"{verb} an EMA saved with a different configuration ({details}); the saved EMA {outcome}"
                " with the new settings.",
                category=UserWarning,
            )
        self._life.loaded(state_dict)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this callback's EMA in the checkpoint, or say that the run starts without one."""
        states = ema_states(checkpoint)
        # an older version may have written this configuration's key un-normalised (`warmup=10` for `10.0`)
        key = find_state_key(states, self.state_key)
        if key is None and len(states) == 1 and len(callbacks_of(trainer, EMAHolder)) == 1:
            key = next(iter(states))
        if key is not None:
            state = checkpoint["callbacks"][key]
            layout = check_ema_state(state, state_key=key, tensors=False)
            missing = any(name not in layout["emas"][0] for name in layout.get("sharded", ()))
            if missing and trainer.ckpt_path is not None and Path(trainer.ckpt_path).is_dir():
                load_sharded_ema(trainer.ckpt_path, key, state, pl_module)
            if key != self.state_key:  # Lightning passes only an exact key's state to `load_state_dict`
                self.load_state_dict(dict(state))
            return  # for our own key, Lightning passes the state to `load_state_dict` next
        if not states and {"current_model_state", "averaging_state"} <= set(checkpoint):
            self._life.loaded(take_lightning_average(pl_module, checkpoint, self._ema_config))
            return
        if states:
            detail = f"it holds EMA states for other settings only: {sorted(states)!r}"
        else:
            detail = "it holds no EMA state"
        self._life.without_ema(trainer.state.fn == "fit", detail)
