"""Shared test material: a tiny model on generated data, a recorder of raw weights, a reference EMA.

The reference EMA is a plain Python loop in float64 over recorded weights; it never calls lightning_ema.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def make_data(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


def make_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size, shuffle=False)


class TinyClassifier(L.LightningModule):
    """Linear -> BatchNorm -> ReLU -> Linear; records what validation, test and predict see."""

    def __init__(self, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.seen_in: dict[str, list[dict[str, Tensor]]] = {"validate": [], "test": [], "predict": []}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _record(self, stage: str, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in[stage].append(snapshot(self))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._record("validate", batch_idx)
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._record("test", batch_idx)
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self._record("predict", batch_idx)
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """An independent copy of every state_dict tensor."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


class WeightRecorder(L.Callback):
    """Records the raw state_dict after each optimizer step: ``steps[i]`` is the step, ``states[i]`` the weights.

    Put it BEFORE the EMACallback in the callback list, so it sees the weights before anything else runs.
    """

    def __init__(self) -> None:
        self.initial: dict[str, Tensor] | None = None
        self.initial_step = 0
        self.steps: list[int] = []
        self.states: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = snapshot(pl_module)
        self.initial_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step > (self.steps[-1] if self.steps else self.initial_step):
            self.steps.append(trainer.global_step)
            self.states.append(snapshot(pl_module))


def reference_ema(
    initial: dict[str, Tensor],
    steps: list[int],
    states: list[dict[str, Tensor]],
    decay_at: Callable[[int], float],
    *,
    every_n_steps: int = 1,
    start_step: int = 0,
    names: list[str] | None = None,
    initial_step: int = 0,
) -> dict[str, Tensor]:
    """The EMA of the recorded weights, element by element in float64 with Python floats for the decay.

    An update happens at each recorded step that is a multiple of ``every_n_steps``; steps up to ``start_step``
    copy; later updates apply the product of the per-step decays of every step since the previous update.
    """
    names = names if names is not None else [n for n, t in initial.items() if t.is_floating_point()]
    ema = {name: initial[name].double().clone() for name in names}
    last = initial_step
    for step, state in zip(steps, states, strict=True):
        if step % every_n_steps:
            continue
        if step <= start_step:
            ema = {name: state[name].double().clone() for name in names}
        else:
            decay = 1.0
            for s in range(max(last, start_step) + 1, step + 1):
                decay *= decay_at(s)
            ema = {name: decay * ema[name] + (1.0 - decay) * state[name].double() for name in names}
        last = step
    return ema


def assert_close_to_reference(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 2e-6) -> None:
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    for name, value in expected.items():
        got = actual[name].double()
        error = (got - value).abs().max().item()
        assert error <= atol + 1e-5 * value.abs().max().item(), f"{name}: max error {error}"


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint file read as users would: on the CPU, weights_only."""
    return torch.load(path, map_location="cpu", weights_only=True)


class CrashAtEpochStart(L.Callback):
    """Simulates a crash (a RuntimeError) when training epoch ``epoch`` begins."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def trainer_kwargs(**overrides: object) -> dict[str, object]:
    kwargs: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def warmup_decay(decay: float, warmup: float) -> Callable[[int], float]:
    return lambda t: min(decay, (1 + t) / (warmup + t))


def constant_decay(decay: float) -> Callable[[int], float]:
    return lambda t: decay


__all__ = [
    "CrashAtEpochStart",
    "TinyClassifier",
    "WeightRecorder",
    "assert_close_to_reference",
    "constant_decay",
    "load",
    "make_data",
    "make_loader",
    "reference_ema",
    "snapshot",
    "trainer_kwargs",
    "warmup_decay",
]
