"""``EMACallback``: the Lightning hooks that drive a :class:`~lightning_ema.EMA`, and which EMA each run uses.

One rule decides which EMA an entry point uses (README, "What the EMA does when..."): the EMA belongs to one
module object, one run and one step count.

- ``fit`` without ``ckpt_path`` starts a new EMA from the module's weights, unless it continues this Trainer's
  previous ``fit`` of the same module; ``fit(ckpt_path=...)`` continues the checkpoint's EMA.
- ``validate``/``test``/``predict`` with ``ckpt_path`` evaluate that checkpoint's EMA; without it, the EMA of the
  very module being evaluated, or, for any other module, that module's own weights (with one warning).
- Spawn launchers hand the EMA back to the main process (a file the worker writes at the end of ``fit``).
- Before each evaluation and at each epoch start the EMA re-pairs by name with tensors that were replaced.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_ema._validate import check_bool, check_choice, check_int
from lightning_ema.checkpoint import FORMAT, VERSION, config_changes, ema_states, load_sharded_ema, shard_key
from lightning_ema.ema import EMA, BufferPolicy, DecayPer, EMAConfig, IntegerBufferPolicy, NonFinitePolicy
from lightning_ema.evaluation import EvaluationPass, MultiPassEvaluation
from lightning_ema.formats import initial_ema, match_names
from lightning_ema.schedules import ConstantDecay, DecaySchedule
from lightning_ema.sharding import is_sharded, to_dtensor

__all__ = ["EMACallback"]

#: Above this share of the initial weights left in the EMA at the end of ``fit``, the callback warns.
_STALE_SHARE = 0.5


@dataclass
class _Run:
    """What the callback knows of the Trainer run in progress (reset by ``setup``)."""

    fn: str = ""
    loaded: dict[str, Any] | None = None  # an EMA state this run's checkpoint delivered
    restart: bool = False  # this run's checkpoint has no EMA
    resolved: bool = False
    warned: set[str] = field(default_factory=set)


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
        self.init_from = _check_init_from(init_from)
        self.evaluate = check_choice("evaluate", evaluate, ("ema", "raw", "both"))
        self.apply_at_end = check_bool("apply_at_end", apply_at_end)
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"`suffix` must be a non-empty string such as '_ema', got {suffix!r}.")
        self.suffix = suffix
        self.distance_every_n_steps = check_int("distance_every_n_steps", distance_every_n_steps, 0)
        self._ema: EMA | None = None
        self._run = _Run()
        self._fit_trainer: Any = None  # a weak reference to the Trainer whose `fit` made `_ema`
        self._multi_pass: MultiPassEvaluation | None = None
        self._log_tags = self._tags_for(position=None)
        self._swapped_for_stage = False
        self._distance_due = False
        # Spawn launchers run `fit` in a copy of this callback: the worker leaves the EMA in this file.
        self._owner_pid = os.getpid()
        self._handover_path = Path(tempfile.gettempdir()) / f"lightning_ema-{self._owner_pid}-{uuid.uuid4().hex}.pt"
        self._handover: dict[str, Any] | None = None
        weakref.finalize(self, _remove_if_owner, self._handover_path, self._owner_pid)

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
        self._take_handover()
        return self._ema

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
        self._take_handover()
        if self._ema is not None:
            return self._ema.num_updates
        if self._handover is not None:
            return int(self._handover["state"]["num_updates"])
        return 0

    def ema_state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """Return the EMA tensors under the LightningModule's ``state_dict`` names.

        The tensors are the live averages, not copies: clone them to keep a snapshot. Tensors the EMA
        does not track (``include``/``exclude``, ``buffers="ignore"``) are absent.

        Args:
            index: which EMA, by position in ``decay``, when there are several.

        Raises:
            RuntimeError: if no EMA exists yet (it is created when ``fit`` starts).
        """
        self._take_handover()
        if self._ema is not None:
            return self._ema.ema_state_dict(index)
        if self._handover is not None:
            emas = self._handover["state"]["emas"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(emas):
                raise ValueError(f"`index` must be an integer in [0, {len(emas)}), got {index!r}.")
            return dict(emas[index])
        raise RuntimeError(
            "The EMA has not been created yet: it is created when `fit` starts, or loaded by "
            "`trainer.validate/test/predict(ckpt_path=...)`."
        )

    @contextmanager
    def swapped(self, pl_module: pl.LightningModule, index: int = 0) -> Iterator[pl.LightningModule]:
        """Context in which ``pl_module`` holds the EMA weights (EMA ``index``); the raw weights return on exit.

        The raw weights come back bit-exactly, also when the block raises. Checkpoints written by
        ``trainer.save_checkpoint`` inside the block still store the raw weights in ``"state_dict"``
        (except with ``weights_only=True``, where Lightning runs no callback hook).

        Raises:
            RuntimeError: if this callback holds no EMA of ``pl_module``.
        """
        self._take_handover()
        if self._ema is None and self._handover is not None:
            self._adopt_handover(pl_module)
        if self._ema is None or self._ema.module is not pl_module:
            raise RuntimeError(
                "This EMACallback holds no EMA of the given module: an EMA is created when `fit` starts, for the "
                "module that `fit` trains (or loaded by `trainer.validate/test/predict(ckpt_path=...)` for the module "
                "evaluated). For a checkpoint's EMA, use `load_ema_state_dict(path)` or evaluate with `ckpt_path=`."
            )
        self._ema.refresh()
        with self._ema.swapped(index):
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

    # ------------------------------------------------------------------ which EMA a run uses
    def _new_ema(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EMA | None:
        """Create the EMA of ``pl_module``'s current weights, or ``None`` while it has lazy parameters."""
        if any(nn.parameter.is_lazy(p) for p in pl_module.parameters()):
            self._note(
                "lazy",
                "EMACallback: the module has uninitialized (lazy) parameters; the EMA is created from them once "
                "the first forward has materialised them, before the first optimizer step.",
                warn=False,
            )
            return None
        ema = EMA.from_config(pl_module, self._ema_config, step=trainer.global_step)
        if self.init_from is not None:
            _start_from(ema, self.init_from, trainer.global_step)
        elif trainer.state.fn == "fit":
            self._warn_if_stale(trainer, ema)
        return ema

    def _load(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]) -> EMA:
        """Create ``pl_module``'s EMA from a saved state (names and shapes checked; nothing half-loaded)."""
        ema = EMA.from_config(pl_module, self._ema_config, step=0)
        ema.load_state_dict(state)
        step = trainer.global_step
        if trainer.state.fn == "fit" and ema.step > step:
            rank_zero_warn(
                f"The loaded EMA was last updated at optimizer step {ema.last_update_step}, ahead of this run's step "
                f"{step} (an imported or edited state): the EMA is kept and counts its steps from {step} on.",
                category=UserWarning,
            )
            ema.count_steps_from(step)
        return ema

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EMA | None:
        """Decide once per run which EMA the run uses; return it if it is ``pl_module``'s (else ``None``)."""
        run = self._run
        if not run.resolved:
            run.resolved = True
            self._take_handover()
            loaded, run.loaded = run.loaded, None
            fitting = trainer.state.fn == "fit"
            if loaded is not None:
                self._ema, self._handover = self._load(trainer, pl_module, loaded), None
                self._fit_trainer = None  # a later `fit` without `ckpt_path` does not continue a loaded EMA
            elif fitting:
                self._resolve_fit(trainer, pl_module)
            elif self._ema is None and self._handover is not None:
                self._adopt_handover(pl_module)
            if fitting:
                self._fit_trainer = weakref.ref(trainer)
        if self._ema is not None and self._ema.module is pl_module:
            self._ema.refresh()
            return self._ema
        return None

    def _resolve_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self._ema
        previous_fit = self._fit_trainer() if self._fit_trainer is not None else None
        continuing = (
            not self._run.restart
            and ema is not None
            and ema.module is pl_module
            and previous_fit is trainer
            and ema.step <= trainer.global_step
        )
        if continuing:
            return
        if (ema is not None or self._handover is not None) and not self._run.restart:
            rank_zero_info(
                "EMACallback: this `fit` has no `ckpt_path`, so it starts a new EMA from the model's weights (the "
                "previous EMA is dropped). Pass `ckpt_path=` to continue a saved EMA."
            )
        self._handover = None
        self._ema = self._new_ema(trainer, pl_module)

    def _note(self, key: str, message: str, *, warn: bool = True) -> None:
        """Say ``message`` once per run (a warning, or an info line)."""
        if key in self._run.warned:
            return
        self._run.warned.add(key)
        if warn:
            rank_zero_warn(message, category=UserWarning)
        else:
            rank_zero_info(message)

    def _warn_if_stale(self, trainer: pl.Trainer, ema: EMA) -> None:
        """Warn if, at the end of this run, the EMA would still be mostly the weights it starts from."""
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            try:
                estimated = trainer.estimated_stepping_batches
            except Exception:
                return
            if not math.isfinite(estimated):
                return
            total = int(estimated)
        shares = self._ema_config.policy.share_left(trainer.global_step, total)
        for schedule, share in zip(self.schedules, shares or (), strict=False):
            if share > _STALE_SHARE:
                rank_zero_warn(
                    f"EMACallback: with {schedule!r}, the EMA at the end of this run ({total} optimizer steps) is "
                    f"still {share:.0%} the initial weights, so evaluating and saving it mostly shows untrained "
                    "weights. Use a smaller decay (time constant 1/(1-decay) well below the run's length) or a "
                    "warm-up schedule such as `WarmupDecay`.",
                    category=UserWarning,
                )
                return

    # ------------------------------------------------------------------ spawn hand-over
    def _take_handover(self) -> None:
        """Pick up the EMA a spawned ``fit`` worker left for this (main) process."""
        path = self._handover_path
        if not path.is_file():
            return
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return
        if os.getpid() == self._owner_pid:
            path.unlink(missing_ok=True)
        self._handover, self._ema = payload, None

    def _write_handover(self, trainer: pl.Trainer) -> None:
        """In a spawned worker (rank 0), leave the EMA for the main process."""
        ema = self._ema
        if ema is None or os.getpid() == self._owner_pid or trainer.global_rank != 0 or ema.sharding:
            return
        state = {"format": FORMAT, "version": VERSION, "config": self._config(), **ema.state_dict()}
        payload = {"state": state, "digest": _digest(ema.raw_state_dict())}
        partial_path = self._handover_path.with_suffix(".part")
        torch.save(payload, partial_path)
        os.replace(partial_path, self._handover_path)

    def _adopt_handover(self, pl_module: pl.LightningModule) -> None:
        """Bind a handed-over EMA to ``pl_module`` if it holds the raw weights that ``fit`` ended with."""
        handover = self._handover
        if handover is None:
            return
        live = pl_module.state_dict()
        digest = handover["digest"]
        if not set(digest) <= set(live):
            return
        now = _digest({name: live[name] for name in digest})
        if now.keys() == digest.keys() and all(
            math.isclose(now[name], value, rel_tol=1e-9, abs_tol=1e-12) for name, value in digest.items()
        ):
            ema = EMA.from_config(pl_module, self._ema_config, step=0)
            ema.load_state_dict(handover["state"])
            self._ema, self._handover = ema, None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle for spawn launchers (a hand-over waiting in the file travels with the callback)."""
        self._take_handover()
        state = self.__dict__.copy()
        state["_fit_trainer"] = None  # weak references do not pickle
        return state

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Start a new run; refuse configurations the EMA cannot serve; name the decay metric if there are several."""
        _refuse_unsupported_strategy(trainer.strategy)
        self._run = _Run(fn=str(getattr(trainer.state.fn, "value", trainer.state.fn)))
        if self.evaluate != "raw" and getattr(pl_module, "ema_evaluates_own_average", False):
            raise ValueError(
                f"{type(pl_module).__name__} evaluates its teacher (an average of its own), and "
                f"EMACallback(evaluate={self.evaluate!r}) would put its EMA over it. Choose one: "
                "`EMACallback(evaluate='raw')`, or the module's `evaluate='student'` to evaluate the callback's EMA."
            )
        siblings = _ema_callbacks(trainer)
        swapping = [callback for callback in siblings if callback.evaluate != "raw"]
        if len(swapping) > 1:
            raise ValueError(
                f"{len(swapping)} EMACallbacks would each put their EMA into the model for evaluation "
                f"(evaluate={[callback.evaluate for callback in swapping]!r}); their swaps cannot nest. Set "
                "`evaluate='raw'` on all but one of them."
            )
        self._log_tags = self._tags_for(siblings.index(self) if len(siblings) > 1 else None)
        if stage == "fit" and any(
            isinstance(c, ModelCheckpoint) and c.save_weights_only
            for c in trainer.callbacks  # type: ignore[attr-defined]
        ):
            self._note(
                "weights_only",
                "ModelCheckpoint(save_weights_only=True) writes checkpoints without callback states, so they hold "
                "no EMA (`load_ema_state_dict` and `ckpt_path=` will find none). Save full checkpoints to keep it.",
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the EMA from the model (or take the checkpoint's, when resuming) before the first step."""
        self._resolve(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-pair the EMA by name with tensors replaced since the last check (reassigned buffers, SWA)."""
        if self._ema is not None:
            self._ema.refresh()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Create the EMA of a lazy module once its first forward has materialised it, before its first step."""
        if self._ema is None and self._run.resolved and trainer.state.fn == "fit":
            self._ema = self._new_ema(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the EMA if an optimizer step due for an update happened in this batch; log when loggers write."""
        ema = self._ema
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
        ema = self._resolve(trainer, pl_module)
        if ema is None:
            if self.evaluate != "raw" and not trainer.sanity_checking:
                self._explain_raw_evaluation(trainer)
            return
        ema.take_rank_zero_buffers()
        several_passes = self.evaluate == "both" or (self.evaluate == "ema" and self._several)
        if several_passes and step_name is not None:
            passes = [EvaluationPass("", nullcontext)] if self.evaluate == "both" else []
            for index, suffix in enumerate(self.suffixes()):
                passes.append(EvaluationPass(suffix, partial(ema.swapped, index)))
            self._multi_pass = MultiPassEvaluation(pl_module, step_name, passes)
            self._multi_pass.install()
        elif self.evaluate != "raw" and not self._swapped_for_stage:
            ema.swap_in()
            self._swapped_for_stage = True

    def _explain_raw_evaluation(self, trainer: pl.Trainer) -> None:
        fn = self._run.fn or "evaluation"
        if self._run.restart:
            detail = "the checkpoint being loaded holds no EMA"
        elif self._ema is not None or self._handover is not None:
            detail = "its EMA belongs to another module instance (the one `fit` trained), not the one being evaluated"
        elif trainer.state.fn == "fit":
            detail = "the EMA is not created yet (a lazy module is materialised by the first training step)"
        else:
            detail = "no `fit` ran with it and no checkpoint with an EMA was loaded"
        self._note(
            "raw",
            f"EMACallback: this {fn} run evaluates the module's own (raw) weights: {detail}. To evaluate a "
            f"checkpoint's EMA, pass its path: `trainer.{fn}(model, ckpt_path=...)`.",
        )

    def _end_evaluation(self) -> None:
        if self._multi_pass is not None:
            self._multi_pass.uninstall()
            self._multi_pass = None
        if self._swapped_for_stage:
            self._swapped_for_stage = False
            if self._ema is not None:
                self._ema.swap_out()

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
        if self._multi_pass is not None:
            self._multi_pass.uninstall()
            self._multi_pass = None
        self._swapped_for_stage = False
        if self._ema is not None:
            self._ema.swap_out(force=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give every rank rank 0's buffer EMA, so that what follows training (export, test) agrees across ranks."""
        if self._ema is not None:
            self._ema.take_rank_zero_buffers()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Copy the EMA into the model if ``apply_at_end``; hand the EMA to the main process from a spawned worker."""
        if self.apply_at_end and self._ema is not None:
            self._ema.copy_to()
        self._write_handover(trainer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the raw weights in ``checkpoint["state_dict"]``; store sharded EMA where every rank's shard is saved."""
        ema = self._ema
        state_dict = checkpoint.get("state_dict")
        if ema is None or ema.module is not pl_module:
            return
        sharding = ema.sharding
        # A distributed checkpoint holds DTensors; a single-file one full tensors on rank 0 (nothing on the others).
        distributed = state_dict is not None and any(is_sharded(value) for value in state_dict.values())
        if sharding:
            own = (checkpoint.get("callbacks") or {}).get(self.state_key)
            for index in range(ema.num_emas):
                averages = ema.ema_state_dict(index)
                for name, layout in sharding.items():
                    shards = to_dtensor(averages[name], layout)
                    if distributed and state_dict is not None:
                        state_dict[shard_key(self.state_key, index, name)] = shards
                    else:
                        full = shards.full_tensor()  # type: ignore[attr-defined]  # a collective: every rank
                        if own is not None:
                            own["emas"][index][name] = full
        if not ema.is_swapped or state_dict is None:
            return
        for name, raw in ema.raw_state_dict().items():
            raw_layout = sharding.get(name)
            if raw_layout is not None:
                raw = to_dtensor(raw, raw_layout)
                if not distributed:
                    raw = raw.full_tensor()  # type: ignore[attr-defined]
            if name in state_dict:
                state_dict[name] = raw

    @override
    def state_dict(self) -> dict[str, Any]:
        """Return the EMA, its counters and a configuration fingerprint (tensors and plain values only)."""
        self._take_handover()
        if self._ema is None:
            pending = self._run.loaded or (self._handover or {}).get("state")
            return dict(pending) if pending else {}
        state = {"format": FORMAT, "version": VERSION, "config": self._config(), **self._ema.state_dict()}
        state.pop("shard", None)  # the callback stores shards itself, every rank's in the checkpoint
        sharded = self._ema.sharding
        if sharded:
            # Local shards must not reach rank 0's file; on_save_checkpoint stores them where every rank's go.
            state["emas"] = [{n: t for n, t in ema.items() if n not in sharded} for ema in state["emas"]]
            state["sharded"] = sorted(sharded)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a saved EMA for this run; it is checked against the model's names and shapes when it is applied."""
        if state_dict.get("format") != FORMAT:
            raise ValueError(f"The state is not an EMACallback state: keys {sorted(state_dict)!r}.")
        version = state_dict.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version > VERSION:
            raise ValueError(
                f"The EMA state has format version {version!r}; this lightning-ema reads versions up to {VERSION}."
                " Upgrade lightning-ema to load it."
            )
        saved = dict(state_dict.get("config", {}))
        if "decay" in saved:  # version 1 described its single schedule under "decay"
            saved["decays"] = [saved.pop("decay")]
        details = config_changes(saved, self._config())
        if details:
            fitting = self._run.fn in ("", "fit")
            verb, outcome = ("Resuming", "continues") if fitting else ("Loading", "is used")
            rank_zero_warn(
                f"{verb} an EMA saved with a different configuration ({details}); the saved EMA {outcome}"
                " with the new settings.",
                category=UserWarning,
            )
        self._run.restart = False
        self._run.loaded = dict(state_dict)
        self._run.resolved = False

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this callback's EMA in the checkpoint, or say that the run starts without one."""
        states = ema_states(checkpoint)
        key = self.state_key if self.state_key in states else None
        adopt = key is None and len(states) == 1 and len(_ema_callbacks(trainer)) == 1
        if adopt:
            key = next(iter(states))
        if key is not None:
            state = checkpoint["callbacks"][key]
            missing = state.get("sharded") and any(name not in state["emas"][0] for name in state["sharded"])
            if missing and trainer.ckpt_path is not None and Path(trainer.ckpt_path).is_dir():
                load_sharded_ema(trainer.ckpt_path, key, state, pl_module)
            if adopt:
                self.load_state_dict(dict(state))
            return  # for our own key, Lightning passes the state to `load_state_dict` next
        if not states and {"current_model_state", "averaging_state"} <= set(checkpoint):
            self._take_lightning_average(trainer, pl_module, checkpoint)
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
        self._run.restart = True
        self._run.loaded = None
        self._run.resolved = False
        if fitting:
            self._ema = None
            self._fit_trainer = None

    def _take_lightning_average(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Continue from a Lightning ``EMAWeightAveraging`` checkpoint: raw weights back in, its average as the EMA.

        Lightning has loaded ``checkpoint["state_dict"]``, which that callback fills with the average, into the
        module; the raw weights are in ``current_model_state``.
        """
        pl_module.load_state_dict(checkpoint["current_model_state"])
        names = _tracked_names(pl_module, self._ema_config)
        weights = match_names(checkpoint["state_dict"], names)
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
        self._run.restart = False
        self._run.resolved = False
        self._run.loaded = {
            "format": FORMAT,
            "version": VERSION,
            "config": self._config(),
            "num_updates": num_updates,
            "last_update_step": last,
            "step": step,
            "emas": [dict(weights) for _ in self.schedules],
        }


def _check_init_from(value: Any) -> str | os.PathLike[str] | Mapping[str, Any] | None:
    """Return ``init_from`` if it is ``None``, a mapping or the path of an existing file or folder."""
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, (str, os.PathLike)) and Path(value).exists():
        return value
    raise ValueError(
        "`init_from` must be None, a checkpoint or state dict, or the path of an existing checkpoint file, "
        f"got {value!r}."
    )


def _tracked_names(module: nn.Module, config: EMAConfig) -> list[str]:
    """The ``state_dict`` names an EMA with ``config`` tracks in ``module`` (no tensor is allocated)."""
    from lightning_ema._selection import select

    selected = select(
        module,
        include=config.include,
        exclude=config.exclude,
        buffers=config.buffers,
        integer_buffers=config.integer_buffers,
    )
    return [name for item in selected for name in item.names]


def _start_from(ema: EMA, source: str | os.PathLike[str] | Mapping[str, Any], step: int) -> None:
    """Replace a new EMA's tensors by those of ``source`` (any readable layout); buffers it lacks stay as they are."""
    current = {k: ema.ema_state_dict(k) for k in range(ema.num_emas)}
    buffers = set(ema.module.state_dict()) - {name for name, _ in ema.module.named_parameters(remove_duplicate=False)}
    weights = match_names(initial_ema(source, ema.module), list(current[0]), optional=sorted(buffers))
    emas = [{name: weights.get(name, tensor) for name, tensor in current[k].items()} for k in range(ema.num_emas)]
    ema.load_state_dict({"num_updates": 0, "last_update_step": step, "step": step, "emas": emas})


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


def _digest(tensors: dict[str, Tensor]) -> dict[str, float]:
    """A float64 sum per floating-point tensor: enough to recognise the weights a spawned ``fit`` ended with."""
    return {name: float(t.detach().double().sum()) for name, t in tensors.items() if t.is_floating_point()}


def _remove_if_owner(path: Path, owner_pid: int) -> None:
    """Delete a hand-over file nobody read, from the process that made the callback only."""
    if os.getpid() == owner_pid:
        path.unlink(missing_ok=True)
        path.with_suffix(".part").unlink(missing_ok=True)
