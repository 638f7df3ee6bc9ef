"""Evaluate several weight sets in one validation or test run, each with its own metric state.

Lightning runs one evaluation loop. To validate the raw weights and one or more EMAs in the same run, the
module's step method (``validation_step`` or ``test_step``) is replaced, for the duration of the run, by
one that calls the original once per weight set on the same batch:

- each pass enters its weights (nothing for the raw weights, an EMA swapped in otherwise) and logs every
  name with its suffix (``val_acc`` -> ``val_acc_ema``; an empty suffix keeps the module's names);
- the first pass uses the module's own torchmetrics ``Metric`` objects, each further pass its own copies,
  so that ``self.log("val_acc", self.acc)`` accumulates each pass separately.

Only the first pass's output reaches ``on_*_batch_end`` hooks; epoch-level hooks run once. The cost is one
extra forward per batch and weight set, plus the swap in and out around it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from torch import nn

__all__ = ["EvaluationPass", "EvaluationSwitch", "MultiPassEvaluation"]


@dataclass(frozen=True)
class EvaluationPass:
    """One weight set to evaluate: its log-name suffix and a context that puts its weights in the module."""

    suffix: str
    weights: Callable[[], AbstractContextManager[Any]]


def _metric_slots(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Return (parent, attribute, path from ``module``) of every torchmetrics ``Metric`` inside ``module``."""
    from torchmetrics import Metric

    slots = []
    for path, parent in module.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, Metric):
                slots.append((parent, name, f"{path}.{name}" if path else name))
    return slots


class MultiPassEvaluation:
    """Replace ``module.<step_name>`` with a step that runs every pass on each batch.

    Args:
        module: the LightningModule being evaluated.
        step_name: ``"validation_step"`` or ``"test_step"``.
        passes: the weight sets; the first is the primary pass (its suffix is normally ``""``).
    """

    def __init__(self, module: nn.Module, step_name: str, passes: list[EvaluationPass]) -> None:
        self.module = module
        self.step_name = step_name
        self.passes = passes
        self._installed = False
        self._slots = _metric_slots(module)
        # One set of metric copies per extra pass; fresh for each run so no state leaks between runs.
        self._metrics = [[copy.deepcopy(parent._modules[name]) for parent, name, _ in self._slots] for _ in passes[1:]]
        # Lightning finds a logged Metric's attribute in a map it built from the module's own metrics; the copies
        # are not in it, so their logs name the attribute explicitly (the originals keep theirs).
        self._attribute_of = {
            id(metric): path + evaluation.suffix
            for evaluation, metrics in zip(passes[1:], self._metrics, strict=True)
            for metric, (_, _, path) in zip(metrics, self._slots, strict=True)
        }

    def install(self) -> None:
        """Put the multi-pass step on the module instance (the class's method is untouched)."""
        original = getattr(self.module, self.step_name)

        def step(*args: Any, **kwargs: Any) -> Any:
            primary = self.passes[0]
            with primary.weights(), self._suffixed_log(primary.suffix):
                output = original(*args, **kwargs)
            for index, evaluation in enumerate(self.passes[1:]):
                with evaluation.weights(), self._metrics_of(index), self._suffixed_log(evaluation.suffix):
                    original(*args, **kwargs)
            return output

        setattr(self.module, self.step_name, step)
        self._installed = True

    def uninstall(self) -> None:
        """Remove the instance attribute, so the module's own step method is found again."""
        if self._installed:
            self._installed = False
            self.module.__dict__.pop(self.step_name, None)

    @contextmanager
    def _metrics_of(self, index: int) -> Iterator[None]:
        originals = [parent._modules[name] for parent, name, _ in self._slots]
        for (parent, name, _), replacement in zip(self._slots, self._metrics[index], strict=True):
            parent._modules[name] = replacement
        try:
            yield
        finally:
            for (parent, name, _), original in zip(self._slots, originals, strict=True):
                parent._modules[name] = original

    @contextmanager
    def _suffixed_log(self, suffix: str) -> Iterator[None]:
        if not suffix:
            yield
            return
        module = self.module
        log = cast(Callable[..., None], module.log)

        attribute_of = self._attribute_of

        def suffixed(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("metric_attribute") is None and id(value) in attribute_of:
                kwargs["metric_attribute"] = attribute_of[id(value)]
            log(name + suffix, value, *args, **kwargs)

        module.__dict__["log"] = suffixed
        try:
            yield
        finally:
            module.__dict__.pop("log", None)


class EvaluationSwitch:
    """Puts the weights an evaluation run uses into the module at its start and takes them out at its end.

    ``"ema"`` with one EMA swaps it in for the whole run; ``"both"`` or several EMAs run each batch once per
    weight set (:class:`MultiPassEvaluation`); ``"raw"`` changes nothing.
    """

    def __init__(self) -> None:
        self._multi_pass: MultiPassEvaluation | None = None
        self._swapped: Any = None  # the EMA swapped in for the whole run

    def begin(self, ema: Any, module: nn.Module, evaluate: str, suffixes: list[str], step_name: str | None) -> None:
        """Enter the run's weights (``step_name``: the step method to run per weight set, ``None`` for predict)."""
        several_passes = evaluate == "both" or (evaluate == "ema" and len(suffixes) > 1)
        if several_passes and step_name is not None:
            passes = [EvaluationPass("", nullcontext)] if evaluate == "both" else []
            for index, suffix in enumerate(suffixes):
                passes.append(EvaluationPass(suffix, partial(ema.swapped, index)))
            self._multi_pass = MultiPassEvaluation(module, step_name, passes)
            self._multi_pass.install()
        elif evaluate != "raw" and self._swapped is None:
            ema.swap_in()
            self._swapped = ema

    def end(self, *, force: bool = False) -> None:
        """Restore the module's own step method and raw weights (``force``: whatever the swap depth)."""
        if self._multi_pass is not None:
            self._multi_pass.uninstall()
            self._multi_pass = None
        swapped, self._swapped = self._swapped, None
        if swapped is not None:
            swapped.swap_out(force=force)
