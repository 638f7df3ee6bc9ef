"""Which EMA a Trainer run uses: one rule for every entry point (README, "What the EMA does when...").

The EMA belongs to one module object, one run and one step count:

- ``fit`` without ``ckpt_path`` starts a new EMA from the module's weights, unless it continues this Trainer's
  previous ``fit`` of the same module; ``fit(ckpt_path=...)`` continues the checkpoint's EMA.
- ``validate``/``test``/``predict`` with ``ckpt_path`` evaluate that checkpoint's EMA; without it, the EMA of the
  very module being evaluated, or, for any other module, that module's own weights (with one warning).
- A new EMA starts from the weights or from ``init_from`` (:mod:`lightning_ema._new_ema`); a checkpoint's EMA state
  (or a Lightning ``EMAWeightAveraging`` average, :mod:`lightning_ema._lightning_average`) is kept until it is bound.
- Spawn launchers hand the EMA back to the main process (:mod:`lightning_ema._handover`).
- Before each evaluation and at each epoch start the EMA re-pairs by name with tensors that were replaced.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_ema._handover import SpawnHandover
from lightning_ema._new_ema import InitFrom, start_from, warn_if_stale
from lightning_ema._state_validation import FORMAT, VERSION
from lightning_ema.ema import EMA, EMAConfig
from lightning_ema.errors import EMAStateError

__all__ = ["EMALifecycle"]


@dataclass
class _Run:
    """What is known of the Trainer run in progress (reset by ``setup``)."""

    fn: str = ""
    loaded: dict[str, Any] | None = None  # an EMA state this run's checkpoint delivered
    restart: bool = False  # this run's checkpoint has no EMA
    read: bool = False  # the callback saw this run's checkpoint (Lightning skips it for one without callback states)
    resolved: bool = False
    warned: set[str] = field(default_factory=set)


class EMALifecycle:
    """The EMA of an :class:`~lightning_ema.EMACallback` across runs: which one exists, and which one a run uses.

    Args:
        config: the validated EMA settings.
        init_from: a checkpoint or state dict a new EMA starts from (any layout :mod:`.formats` reads).
    """

    def __init__(self, config: EMAConfig, init_from: InitFrom) -> None:
        self.config = config
        self.init_from = init_from
        #: The callback's name in messages (its ``state_key``, set when a run starts).
        self.name = "EMACallback"
        self._ema: EMA | None = None
        self.run = _Run()
        self._fit_trainer: Any = None  # a weak reference to the Trainer whose `fit` made the EMA
        self.handover = SpawnHandover()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle for spawn launchers (a hand-over waiting in the file travels along)."""
        self.take_handover()
        state = self.__dict__.copy()
        state["_fit_trainer"] = None  # weak references do not pickle
        return state

    # ------------------------------------------------------------------ what exists
    @property
    def ema(self) -> EMA | None:
        """The current EMA (after picking up one a spawned worker handed back)."""
        self.take_handover()
        return self._ema

    @property
    def bound(self) -> EMA | None:
        """The current EMA, without looking for a hand-over (for the per-step hooks)."""
        return self._ema

    def take_handover(self) -> None:
        """Pick up the EMA a spawned ``fit`` worker left; it replaces whatever this process held."""
        if self.handover.take():
            self._ema = None

    def for_module(self, module: nn.Module) -> EMA | None:
        """The EMA of exactly ``module`` (binding a hand-over that belongs to it), else ``None``."""
        self.take_handover()
        if self._ema is None:
            self._adopt_handover(module)
        if self._ema is not None and self._ema.module is module:
            return self._ema
        return None

    def saved_state(self) -> dict[str, Any] | None:
        """A state waiting to be bound (loaded this run, or handed over), if no EMA exists."""
        self.take_handover()
        return self.run.loaded or self.handover.state

    def num_updates(self) -> int:
        """Updates of the current (or handed-over) EMA, ``0`` if none exists."""
        ema, handed = self.ema, self.handover.state
        if ema is not None:
            return ema.num_updates
        return 0 if handed is None else int(handed["num_updates"])

    def ema_state_dict(self, index: int) -> dict[str, Tensor]:
        """EMA ``index`` of the current EMA, or of a handed-over one not bound yet, by ``state_dict`` name."""
        ema, handed = self.ema, self.handover.state
        if ema is not None:
            return ema.ema_state_dict(index)
        if handed is not None:
            emas = handed["emas"]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(emas):
                raise ValueError(f"`index` must be an integer in [0, {len(emas)}), got {index!r}.")
            return dict(emas[index])
        raise RuntimeError(
            "The EMA has not been created yet: it is created when `fit` starts, or loaded by "
            "`trainer.validate/test/predict(ckpt_path=...)`."
        )

    # ------------------------------------------------------------------ runs
    def start_run(self, fn: str, name: str) -> None:
        """Begin a Trainer run (``setup``) of the callback called ``name``; the EMA is decided when first needed."""
        self.run = _Run(fn=fn)
        self.name = name

    def note(self, key: str, message: str, *, warn: bool = True) -> None:
        """Say ``message`` once per run (a warning, or an info line)."""
        if key in self.run.warned:
            return
        self.run.warned.add(key)
        if warn:
            rank_zero_warn(message, category=UserWarning)
        else:
            rank_zero_info(message)

    def loaded(self, state: dict[str, Any]) -> None:
        """This run's checkpoint delivered ``state``: the run uses it."""
        self.run.read = True
        self.run.restart = False
        self.run.loaded = dict(state)
        self.run.resolved = False

    def without_ema(self, fitting: bool, detail: str) -> None:
        """Say that this run's checkpoint has no EMA for this callback (``detail``: what it holds), and restart."""
        outcome = "the EMA starts from the loaded weights" if fitting else "the loaded raw weights are evaluated"
        rank_zero_warn(
            f"The checkpoint being loaded has no EMA for {self.name} ({detail}); {outcome}.", category=UserWarning
        )
        self.restart(fitting)

    def restart(self, fitting: bool) -> None:
        """This run's checkpoint has no EMA: ``fit`` starts one from the loaded weights, evaluation uses none."""
        self.run.read = True
        self.run.restart = True
        self.run.loaded = None
        self.run.resolved = False
        if fitting:
            self._ema = None
            self._fit_trainer = None

    def resolve(self, trainer: pl.Trainer, module: pl.LightningModule) -> EMA | None:
        """Decide once per run which EMA the run uses; return it if it is ``module``'s (else ``None``)."""
        run = self.run
        fitting = trainer.state.fn == "fit"
        if not run.resolved:
            run.resolved = True
            if trainer.ckpt_path is not None and not run.read:
                # Lightning calls no callback's `on_load_checkpoint` for a checkpoint without callback states
                self.without_ema(fitting, "it holds no callback states: a weights-only checkpoint")
            self.take_handover()
            loaded, run.loaded = run.loaded, None
            if loaded is not None:
                self._ema, self.handover.payload = self._load(trainer, module, loaded), None
                self._fit_trainer = None  # a later `fit` without `ckpt_path` does not continue a loaded EMA
            elif fitting:
                self._resolve_fit(trainer, module)
            elif self._ema is None:
                self._adopt_handover(module)
            if fitting:
                self._fit_trainer = weakref.ref(trainer)
        if run.restart and not fitting:
            return None  # the checkpoint's raw weights are evaluated, not an EMA this callback held before
        if self._ema is not None and self._ema.module is module:
            self._ema.refresh()
            return self._ema
        return None

    def _resolve_fit(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        ema = self._ema
        previous_fit = self._fit_trainer() if self._fit_trainer is not None else None
        continuing = (
            not self.run.restart
            and ema is not None
            and ema.module is module
            and previous_fit is trainer
            and ema.step <= trainer.global_step
        )
        if continuing:
            return
        if (ema is not None or self.handover.payload is not None) and not self.run.restart:
            rank_zero_info(
                "EMACallback: this `fit` has no `ckpt_path`, so it starts a new EMA from the model's weights (the "
                "previous EMA is dropped). Pass `ckpt_path=` to continue a saved EMA."
            )
        self.handover.payload = None
        self._ema = self.new_ema(trainer, module)

    def new_ema(self, trainer: pl.Trainer, module: pl.LightningModule) -> EMA | None:
        """Create the EMA of ``module``'s current weights, or ``None`` while it has lazy parameters."""
        if any(nn.parameter.is_lazy(p) for p in module.parameters()):
            self.note(
                "lazy",
                "EMACallback: the module has uninitialized (lazy) parameters; the EMA is created from them once "
                "the first forward has materialised them, before the first optimizer step.",
                warn=False,
            )
            return None
        ema = EMA.from_config(module, self.config, step=trainer.global_step)
        if self.init_from is not None:
            start_from(ema, self.init_from, trainer.global_step)
        elif trainer.state.fn == "fit":
            warn_if_stale(trainer, self.config)
        return ema

    def create_lazily(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """Create the EMA of a lazy module once materialised (before its first optimizer step)."""
        if self._ema is None and self.run.resolved and trainer.state.fn == "fit":
            self._ema = self.new_ema(trainer, module)

    def _load(self, trainer: pl.Trainer, module: pl.LightningModule, state: dict[str, Any]) -> EMA:
        """Create ``module``'s EMA from a saved state (names and shapes checked; nothing half-loaded)."""
        ema = EMA.from_config(module, self.config, step=0)
        try:
            ema.load_state_dict(state)
        except EMAStateError as error:
            raise EMAStateError(f"{self.name}: {error}") from error
        step = trainer.global_step
        if trainer.state.fn == "fit" and ema.step > step:
            rank_zero_warn(
                f"The loaded EMA was last updated at optimizer step {ema.last_update_step}, ahead of this run's step "
                f"{step} (an imported or edited state): the EMA is kept and counts its steps from {step} on.",
                category=UserWarning,
            )
            ema.count_steps_from(step)
        return ema

    def _adopt_handover(self, module: nn.Module) -> None:
        """Bind a handed-over EMA to ``module`` if it holds the raw weights that ``fit`` ended with."""
        state = self.handover.state
        if state is not None and self.handover.belongs_to(module):
            ema = EMA.from_config(module, self.config, step=0)
            ema.load_state_dict(state)
            self._ema, self.handover.payload = ema, None

    def write_handover(self, trainer: pl.Trainer, describe: dict[str, Any]) -> None:
        """In a spawned worker (rank 0), leave the EMA for the main process."""
        ema = self._ema
        if ema is None or trainer.global_rank != 0 or ema.sharding:
            return
        state = {"format": FORMAT, "version": VERSION, "config": describe, **ema.state_dict()}
        self.handover.write(state, ema.raw_state_dict())

    # ------------------------------------------------------------------ what is said
    def explain_raw_evaluation(self, trainer: pl.Trainer) -> None:
        """Say once why this run evaluates the module's own weights, and how to evaluate a checkpoint's EMA."""
        fn = self.run.fn or "evaluation"
        if self.run.restart:
            return  # `without_ema` said so when the checkpoint was read
        if self._ema is not None or self.handover.payload is not None:
            detail = "its EMA belongs to another module instance (the one `fit` trained), not the one being evaluated"
        elif trainer.state.fn == "fit":
            detail = "the EMA is not created yet (a lazy module is materialised by the first training step)"
        else:
            detail = "no `fit` ran with it and no checkpoint with an EMA was loaded"
        self.note(
            "raw",
            f"EMACallback: this {fn} run evaluates the module's own (raw) weights: {detail}. To evaluate a "
            f"checkpoint's EMA, pass its path: `trainer.{fn}(model, ckpt_path=...)`.",
        )
