"""``EMACallback``: the Lightning hooks that drive a :class:`~lightning_ema.EMA`.

Which EMA each run uses is :mod:`lightning_ema._lifecycle`'s rule; this module only has the hooks, the swaps for
evaluation, logging and the callback's checkpoint state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ema._lifecycle import EMALifecycle, check_init_from
from lightning_ema._saving import complete_checkpoint
from lightning_ema._state_validation import check_ema_state
from lightning_ema._validate import check_bool, check_choice, check_int
from lightning_ema.checkpoint import (
    FORMAT,
    VERSION,
    config_changes,
    ema_states,
    find_state_key,
    load_sharded_ema,
)
from lightning_ema.ema import EMA, BufferPolicy, DecayPer, EMAConfig, IntegerBufferPolicy, NonFinitePolicy
from lightning_ema.evaluation import EvaluationSwitch
from lightning_ema.schedules import ConstantDecay, DecaySchedule

__all__ = ["EMACallback"]


class EMACallback(Callback):
    """Keep an exponential moving average of the model's weights and evaluate with it.

    After every optimizer step ``t`` (or every ``every_n_steps``-th), the EMA of each selected tensor moves
    towards the weights: ``ema = decay_t * ema + (1 - decay_t) * w``. Validation, test and predict run
    with the EMA swapped in (``evaluate="ema"``), and the raw weights come back bit-exactly afterwards,
    also when an exception interrupts. The EMA and its counters are saved in the callback's entry of the
    Lightning checkpoint, so ``trainer.fit(ckpt_path=...)`` continues it exactly, while
    ``checkpoint["state_dict"]`` always holds the raw weights.

    Args:
        decay: a float in [0, 1) or a schedule from :mod:`lightning_ema.schedules`; the update after
            optimizer step ``t`` uses ``decay(t)``. A list keeps one EMA per decay, all updated in one pass
            over the weights, each evaluated and logged under its own suffix (``_ema0.999``).
        every_n_steps: update after every n-th optimizer step (not batch). An update covering n steps
            applies the product of their n decays, so the EMA's time constant does not depend on n.
        start_step: the first ``start_step`` optimizer steps copy the weights into the EMA; averaging
            starts with step ``start_step + 1``.
        device: where the EMA lives: ``None`` keeps each average next to its weight, ``"cpu"`` offloads it.
        dtype: the EMA's dtype. ``None`` keeps float32/float64 and keeps float16/bfloat16 weights' EMA in
            float32 so that small updates are not rounded away. A ``torch.dtype`` or a string such as
            ``"float32"``.
        buffers: ``"average"`` floating-point buffers (integer buffers such as ``num_batches_tracked``
            are copied), ``"copy"`` all buffers from the model at each update, or ``"ignore"`` them.
        include: glob patterns over ``state_dict`` names that are averaged, e.g. ``["generator.*"]``;
            names are matched without wrapper components (``module.``, ``_orig_mod.``,
            ``_forward_module.``). ``None`` selects everything.
        exclude: glob patterns over the same names that are left out.
        evaluate: the weights that validation, test and predict use: ``"ema"``, ``"raw"``, or ``"both"``:
            validation and test run each batch with the raw weights (metrics under their own names) and again
            with the EMA (metrics logged with ``suffix``), each with its own torchmetrics state; predict uses
            the EMA. ``ModelCheckpoint``/``EarlyStopping`` can monitor either name.
        suffix: appended to the names logged by an EMA pass when several passes run (``evaluate="both"`` or
            several decays); with several decays each EMA's suffix ends with its decay (``_ema0.999``) or, for
            schedules other than a constant, its position (``_ema1``).
        distance_every_n_steps: every this many optimizer steps, log ``ema/distance``, the relative distance
            ``||ema - w|| / ||w||`` over the averaged tensors (computed on the device, no host sync; one
            tensor's worth of temporary memory), at the first step after it that the loggers write. ``0`` turns
            it off. Like ``ema/decay`` it is only logged on the steps the Trainer's loggers write
            (``log_every_n_steps``), and not at all without a logger.
        apply_at_end: copy the EMA into the model when ``fit`` ends (the raw weights are then gone).
        nonfinite: an update meeting a NaN or infinite weight raises (``"error"``), is skipped with a
            warning (``"skip"``), or is not checked at all (``"ignore"``: saves one read of the weights).
        phase, count_from_start, decay_per, buffer_decay, integer_buffers, stop_step: how updates are counted
            and applied, for reproducing other libraries' EMAs (defaults: lightning-ema's own rule); see
            :class:`~lightning_ema.EMA` and :mod:`lightning_ema.compat`, which sets them for each replaced hook.
        init_from: start a new EMA from this one instead of from the weights: a checkpoint file or a loaded
            checkpoint in any layout :func:`~lightning_ema.load_ema_state_dict` reads (lightning-ema's, Lightning
            ``EMAWeightAveraging``, NeMo, timm, mmengine/mmdet/mmyolo/mmagic, mmcv, ema-pytorch, diffusers, torch-ema
            paired with the module's parameters), or a plain ``{name: tensor}`` state dict. Names are matched
            without wrapper components and a leading module path; buffers it lacks start from the weights. Used
            whenever ``fit`` starts a new EMA (a ``ckpt_path`` with an EMA takes precedence).

    Raises:
        ValueError: if an argument is invalid; the message names the argument and its value.

    Example::

        trainer = Trainer(callbacks=[EMACallback(decay=0.9999)])
        trainer.fit(model)
        ema_weights = trainer.callbacks[0].ema_state_dict()
    """

    def __init__(
        self,
        decay: float | DecaySchedule | Sequence[float | DecaySchedule] = 0.9999,
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        buffers: BufferPolicy = "average",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        evaluate: str = "ema",
        apply_at_end: bool = False,
        nonfinite: NonFinitePolicy = "error",
        suffix: str = "_ema",
        distance_every_n_steps: int = 100,
        phase: int = 0,
        count_from_start: bool = False,
        decay_per: DecayPer = "step",
        buffer_decay: float | DecaySchedule | None = None,
        integer_buffers: IntegerBufferPolicy = "copy",
        stop_step: int | None = None,
        init_from: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    ) -> None:
        self._ema_config = EMAConfig.create(
            decay,
            every_n_steps=every_n_steps,
            start_step=start_step,
            device=device,
            dtype=dtype,
            buffers=buffers,
            include=include,
            exclude=exclude,
            nonfinite=nonfinite,
            phase=phase,
            count_from_start=count_from_start,
            decay_per=decay_per,
            buffer_decay=buffer_decay,
            integer_buffers=integer_buffers,
            stop_step=stop_step,
        )
        self.init_from = check_init_from(init_from)
        self.evaluate = check_choice("evaluate", evaluate, ("ema", "raw", "both"))
        self.apply_at_end = check_bool("apply_at_end", apply_at_end)
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"`suffix` must be a non-empty string such as '_ema', got {suffix!r}.")
        self.suffix = suffix
        self.distance_every_n_steps = check_int("distance_every_n_steps", distance_every_n_steps, 0)
        self._life = EMALifecycle(self._ema_config, self.init_from)
        self._switch = EvaluationSwitch()
        self._log_tags = self._tags_for(position=None)
        self._distance_due = False

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

    def _tags_for(self, position: int | None) -> list[str]:
        """Log-key tags, one per EMA: ``ema/decay``, ``ema/decay/0.999``, ``ema/decay/1`` or ``ema/decay/1/0.999``.

        ``position`` is this callback's place among several EMA callbacks of the Trainer (``None`` if alone).
        """
        prefix = "" if position is None else f"/{position}"
        if not self._several:
            return [prefix]
        return [f"{prefix}/{_label(schedule, index)}" for index, schedule in enumerate(self.schedules)]

    def suffixes(self) -> list[str]:
        """The log-name suffix of each EMA's evaluation pass (``["_ema"]`` for a single decay)."""
        if not self._several:
            return [self.suffix]
        return [self.suffix + _label(schedule, index) for index, schedule in enumerate(self.schedules)]

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

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start a new run; refuse configurations the EMA cannot serve; name the decay metric if there are several."""
        _refuse_unsupported_strategy(trainer.strategy)
        self._life.start_run(str(getattr(trainer.state.fn, "value", trainer.state.fn)), self.state_key)
        siblings = _ema_callbacks(trainer)
        _refuse_conflicting_swaps(self, siblings, pl_module)
        self._log_tags = self._tags_for(siblings.index(self) if len(siblings) > 1 else None)
        if stage == "fit" and any(
            isinstance(c, ModelCheckpoint) and c.save_weights_only
            for c in trainer.callbacks  # type: ignore[attr-defined]
        ):
            self._life.note(
                "weights_only",
                "ModelCheckpoint(save_weights_only=True) writes checkpoints without callback states, so they hold "
                "no EMA (`load_ema_state_dict` and `ckpt_path=` will find none). Save full checkpoints to keep it.",
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the EMA from the model (or take the checkpoint's, when resuming) before the first step."""
        self._life.resolve(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-pair the EMA by name with tensors replaced since the last check (reassigned buffers, SWA)."""
        ema = self._life.bound
        if ema is not None:
            ema.refresh()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Create the EMA of a lazy module once its first forward has materialised it, before its first step."""
        self._life.create_lazily(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the EMA if an optimizer step due for an update happened in this batch; log when loggers write."""
        ema = self._life.bound
        if ema is None:
            return
        step, previous = trainer.global_step, ema.last_update_step
        every = self.distance_every_n_steps
        if ema.update(step) is not None and every and step // every > previous // every:
            self._distance_due = True  # a multiple of `every` lies in (previous, step]
        # `self.log` costs about half a millisecond: call it only on the steps the loggers write.
        if not ema.last_decays or not _loggers_write_now(trainer):
            return
        for tag, decay in zip(self._log_tags, ema.last_decays, strict=True):
            pl_module.log(f"ema/decay{tag}", decay, on_step=True, on_epoch=False, batch_size=1)
        if self._distance_due:
            self._distance_due = False
            for tag, distance in zip(self._log_tags, ema.relative_distances(), strict=True):
                pl_module.log(f"ema/distance{tag}", distance, on_step=True, on_epoch=False, batch_size=1)

    def _begin_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step_name: str | None = None
    ) -> None:
        ema = self._life.resolve(trainer, pl_module)
        if ema is None:
            if self.evaluate != "raw" and not trainer.sanity_checking:
                self._life.explain_raw_evaluation(trainer)
            return
        ema.take_rank_zero_buffers()
        self._switch.begin(ema, pl_module, self.evaluate, self.suffixes(), step_name)

    def _end_evaluation(self) -> None:
        self._switch.end()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for validation (sanity check included), or validate raw and EMA if ``"both"``."""
        self._begin_evaluation(trainer, pl_module, "validation_step")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the raw weights back before checkpoint callbacks run."""
        self._end_evaluation()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for testing, or test raw and EMA if ``evaluate="both"``."""
        self._begin_evaluation(trainer, pl_module, "test_step")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the raw weights back."""
        self._end_evaluation()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for prediction unless ``evaluate="raw"``."""
        self._begin_evaluation(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the raw weights back."""
        self._end_evaluation()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put the raw weights back, whatever was swapped in, before any checkpoint is written."""
        self._switch.end(force=True)
        ema = self._life.bound
        if ema is not None:
            ema.swap_out(force=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give every rank rank 0's buffer EMA, so that what follows training (export, test) agrees across ranks."""
        ema = self._life.bound
        if ema is not None:
            ema.take_rank_zero_buffers()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the EMA into the model if ``apply_at_end``; hand the EMA to the main process from a spawned worker."""
        ema = self._life.bound
        if self.apply_at_end and ema is not None:
            ema.copy_to()
        self._life.write_handover(trainer, self._config())

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
        if key is None and len(states) == 1 and len(_ema_callbacks(trainer)) == 1:
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
            self._life.take_lightning_average(pl_module, checkpoint)
            return
        if states:
            detail = f"it holds EMA states for other settings only: {sorted(states)!r}"
        else:
            detail = "it holds no EMA state"
        fitting = trainer.state.fn == "fit"
        outcome = "the EMA starts from the loaded weights" if fitting else "the loaded raw weights are evaluated"
        rank_zero_warn(
            f"The checkpoint being loaded has no EMA for {self.state_key} ({detail}); {outcome}.",
            category=UserWarning,
        )
        self._life.restart(fitting)


def _refuse_unsupported_strategy(strategy: object) -> None:
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


def _refuse_conflicting_swaps(callback: EMACallback, siblings: list[EMACallback], module: pl.LightningModule) -> None:
    """Raise if evaluation would need two averages swapped into the module at once (their swaps cannot nest)."""
    if callback.evaluate != "raw" and getattr(module, "ema_evaluates_own_average", False):
        raise ValueError(
            f"{type(module).__name__} evaluates its teacher (an average of its own), and "
            f"EMACallback(evaluate={callback.evaluate!r}) would put its EMA over it. Choose one: "
            "`EMACallback(evaluate='raw')`, or the module's `evaluate='student'` to evaluate the callback's EMA."
        )
    swapping = [sibling for sibling in siblings if sibling.evaluate != "raw"]
    if len(swapping) > 1:
        raise ValueError(
            f"{len(swapping)} EMACallbacks would each put their EMA into the model for evaluation "
            f"(evaluate={[sibling.evaluate for sibling in swapping]!r}); their swaps cannot nest. Set "
            "`evaluate='raw'` on all but one of them."
        )


def _loggers_write_now(trainer: pl.Trainer) -> bool:
    """Whether the Trainer's loggers will write this training batch's step metrics.

    Evaluated in ``on_train_batch_end``, Lightning's own ``should_update_logs`` gives the answer it will use a moment
    later, when it writes the step metrics (its step counter advances only after that).
    """
    if not trainer.loggers:
        return False
    connector = getattr(trainer, "_logger_connector", None)
    return connector is None or bool(connector.should_update_logs) or bool(getattr(trainer, "fast_dev_run", False))


def _ema_callbacks(trainer: pl.Trainer) -> list[EMACallback]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    return [callback for callback in callbacks if isinstance(callback, EMACallback)]


def _label(schedule: DecaySchedule, index: int) -> str:
    """Name an EMA by its decay if it is constant (``0.999``), else by its position."""
    return repr(schedule.decay) if isinstance(schedule, ConstantDecay) else str(index)
