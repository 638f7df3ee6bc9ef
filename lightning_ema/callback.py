"""``EMACallback``: the Lightning hooks that update a :class:`~lightning_ema.EMA`, log it and evaluate with it.

Its base class :class:`~lightning_ema._holder.EMAHolder` holds the EMA (which one each run uses, read access to it,
the checkpoint state); this module has the arguments, the checks of the Trainer in ``setup``, the update and its
logging after each batch, and the swaps for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_ema._holder import EMAHolder
from lightning_ema._new_ema import check_init_from
from lightning_ema._trainer_checks import (
    callbacks_of,
    refuse_conflicting_swaps,
    refuse_unsupported_strategy,
    saves_weights_only,
)
from lightning_ema._training_log import TrainingLog, label
from lightning_ema._validate import check_bool, check_choice, check_int
from lightning_ema.ema import BufferPolicy, DecayPer, EMAConfig, IntegerBufferPolicy, NonFinitePolicy
from lightning_ema.evaluation import EvaluationSwitch
from lightning_ema.schedules import DecaySchedule

__all__ = ["EMACallback"]


class EMACallback(EMAHolder):
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
        config = EMAConfig.create(
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
        super().__init__(config, check_init_from(init_from))
        self.evaluate = check_choice("evaluate", evaluate, ("ema", "raw", "both"))
        self.apply_at_end = check_bool("apply_at_end", apply_at_end)
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"`suffix` must be a non-empty string such as '_ema', got {suffix!r}.")
        self.suffix = suffix
        self.distance_every_n_steps = check_int("distance_every_n_steps", distance_every_n_steps, 0)
        self._switch = EvaluationSwitch()
        self._log = TrainingLog(config.schedules)

    def suffixes(self) -> list[str]:
        """The log-name suffix of each EMA's evaluation pass (``["_ema"]`` for a single decay)."""
        if not self._several:
            return [self.suffix]
        return [self.suffix + label(schedule, index) for index, schedule in enumerate(self.schedules)]

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start a new run; refuse configurations the EMA cannot serve; name the decay metric if there are several."""
        refuse_unsupported_strategy(trainer.strategy)
        self._life.start_run(str(getattr(trainer.state.fn, "value", trainer.state.fn)), self.state_key)
        siblings = callbacks_of(trainer, EMACallback)
        refuse_conflicting_swaps(self.evaluate, [sibling.evaluate for sibling in siblings], pl_module)
        self._log.place(siblings.index(self) if len(siblings) > 1 else None)
        if stage == "fit" and saves_weights_only(trainer):
            self._life.note(
                "weights_only",
                "ModelCheckpoint(save_weights_only=True) writes checkpoints without callback states, so they hold "
                "no EMA (`load_ema_state_dict` and `ckpt_path=` will find none). Save full checkpoints to keep it.",
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the EMA if an optimizer step due for an update happened in this batch; log when loggers write."""
        ema = self._life.bound
        if ema is None:
            return
        step, previous = trainer.global_step, ema.last_update_step
        if ema.update(step) is not None:
            self._log.updated(previous, step, self.distance_every_n_steps)
        self._log.write(trainer, pl_module, ema)

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

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for validation (sanity check included), or validate raw and EMA if ``"both"``."""
        self._begin_evaluation(trainer, pl_module, "validation_step")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the raw weights back before checkpoint callbacks run."""
        self._switch.end()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for testing, or test raw and EMA if ``evaluate="both"``."""
        self._begin_evaluation(trainer, pl_module, "test_step")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the raw weights back."""
        self._switch.end()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for prediction unless ``evaluate="raw"``."""
        self._begin_evaluation(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the raw weights back."""
        self._switch.end()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put the raw weights back, whatever was swapped in, before any checkpoint is written."""
        self._switch.end(force=True)
        ema = self._life.bound
        if ema is not None:
            ema.swap_out(force=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the EMA into the model if ``apply_at_end``; hand the EMA to the main process from a spawned worker."""
        # A `fit` that took no step (resumed from a checkpoint of a finished run) ran no other hook that binds its EMA
        self._life.resolve(trainer, pl_module)
        ema = self._life.bound
        if self.apply_at_end and ema is not None:
            ema.copy_to()
        self._life.write_handover(trainer, self._config())
