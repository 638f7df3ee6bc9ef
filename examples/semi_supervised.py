"""Semi-supervised digits: a mean teacher trained with 10% of the labels against a supervised-only baseline.

    python examples/semi_supervised.py        # writes docs/semi_supervised.png

Both runs see the same labelled batches in the same order, from the same initial weights, for the same number
of optimizer steps. The mean teacher also sees unlabelled images: its student is pulled towards the teacher's
predictions on them (a consistency loss on differently augmented views, ramped up over the first part of
training), and the teacher is the EMA of the student (``MeanTeacherModule``). The script prints the validation
accuracy of the baseline, the student and the teacher, and plots it over training. No download: the 1,797
8x8 digit images ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_ema import MeanTeacherModule
from lightning_ema.schedules import WarmupDecay

DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "docs" / "semi_supervised.png"


@dataclass
class Splits:
    labelled: TensorDataset
    unlabelled: TensorDataset
    val: TensorDataset


def make_splits(label_fraction: float, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Scale the digits to [0, 1], hold out a validation set, and keep labels for ``label_fraction`` of the rest."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    n_labelled = max(10, round(len(train) * label_fraction))
    return Splits(
        labelled=TensorDataset(x[train[:n_labelled]], y[train[:n_labelled]]),
        unlabelled=TensorDataset(x[train]),  # every training image, its label unused
        val=TensorDataset(x[val], y[val]),
    )


def training_loader(
    splits: Splits, seed: int, batch_size: int = 32, unlabelled_batch_size: int = 128
) -> CombinedLoader:
    """One batch of labelled and one of unlabelled images per step; an epoch is one pass over the unlabelled ones.

    Each loader shuffles with its own generator, so every run sees the same batches in the same order.
    """

    def loader(dataset: TensorDataset, size: int, offset: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed + offset)
        return DataLoader(dataset, batch_size=size, shuffle=True, drop_last=True, generator=generator)

    loaders = {
        "labelled": loader(splits.labelled, batch_size, 1),
        "unlabelled": loader(splits.unlabelled, unlabelled_batch_size, 2),
    }
    return CombinedLoader(loaders, mode="max_size_cycle")


def make_net(hidden: int = 256, dropout: float = 0.2) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def augment(x: Tensor, noise: float = 0.15) -> Tensor:
    """Shift each 8x8 image by up to one pixel in each direction and add Gaussian noise."""
    n = len(x)
    padded = nn.functional.pad(x.view(n, 8, 8), (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n, 1, 1), device=x.device)
    rows = torch.arange(8, device=x.device).view(1, 8, 1) + dy
    cols = torch.arange(8, device=x.device).view(1, 1, 8) + dx
    shifted = padded[torch.arange(n, device=x.device).view(n, 1, 1), rows, cols]
    return shifted.reshape(n, 64) + noise * torch.randn_like(x)


def rampup(step: int, length: int) -> float:
    """The sigmoid ramp-up of the Mean Teacher paper: ``exp(-5 (1 - t)^2)``, from about 0.007 to 1."""
    if length <= 0 or step >= length:
        return 1.0
    t = step / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


class SupervisedOnly(L.LightningModule):
    """The baseline: the same network, trained on the labelled batches only."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = make_net()
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["labelled"]
        loss = nn.functional.cross_entropy(self(augment(x)), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


class MeanTeacherDigits(MeanTeacherModule):
    """Cross-entropy on the labelled batch plus a ramped-up consistency loss between student and teacher.

    ``evaluate="student"`` leaves the student's own weights in place during validation, so that the student and
    the teacher (``self.teacher``) can both be measured in the same pass; with the default ``"teacher"``,
    ``self.student`` would compute with the teacher's weights.
    """

    def __init__(
        self, lr: float = 0.05, consistency: float = 10.0, rampup_steps: int = 300, teacher_decay: float = 0.99
    ) -> None:
        super().__init__(teacher_decay=WarmupDecay(decay=teacher_decay, warmup=10), evaluate="student")
        self.lr = lr
        self.consistency = consistency
        self.rampup_steps = rampup_steps
        self.student = make_net()
        self.val_acc_student = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc_teacher = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["labelled"]
        (u,) = batch["unlabelled"]
        supervised = nn.functional.cross_entropy(self.student(augment(x)), y)
        student_probs = self.student(augment(u)).softmax(dim=1)
        with torch.no_grad():
            teacher_probs = self.teacher(augment(u)).softmax(dim=1)
        consistency = nn.functional.mse_loss(student_probs, teacher_probs, reduction="sum") / len(u)
        weight = self.consistency * rampup(self.global_step, self.rampup_steps)
        self.log_dict({"train/supervised": supervised, "train/consistency": consistency})
        return supervised + weight * consistency

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc_student(self.student(x), y)
        self.val_acc_teacher(self.teacher(x), y)
        self.log_dict({"val_acc_student": self.val_acc_student, "val_acc_teacher": self.val_acc_teacher})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


class AccuracyHistory(L.Callback):
    """Records the logged validation metrics after each validation run, by optimizer step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.metrics: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.steps.append(trainer.global_step)
        self.metrics.append({key: float(value) for key, value in trainer.callback_metrics.items()})

    def curve(self, key: str) -> list[float]:
        return [metrics[key] for metrics in self.metrics]


def fit(model: L.LightningModule, splits: Splits, epochs: int, seed: int) -> AccuracyHistory:
    L.seed_everything(seed, verbose=False)
    history = AccuracyHistory()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[history],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, training_loader(splits, seed), DataLoader(splits.val, batch_size=512))
    return history


def plot(baseline: AccuracyHistory, mean_teacher: AccuracyHistory, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    axes.plot(baseline.steps, baseline.curve("val_acc"), label="supervised only (baseline)", color="tab:gray")
    axes.plot(
        mean_teacher.steps, mean_teacher.curve("val_acc_student"), label="mean teacher: student", color="tab:blue"
    )
    axes.plot(mean_teacher.steps, mean_teacher.curve("val_acc_teacher"), label="mean teacher: teacher", color="tab:red")
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("validation accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    low = min(min(baseline.curve("val_acc")[len(baseline.steps) // 10 :], default=0.0), 0.8)
    axes.set_ylim(max(0.0, low - 0.02), 1.0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100, help="passes over the unlabelled images")
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--teacher-decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_PLOT, help="where to write the PNG plot")
    args = parser.parse_args(argv)

    splits = make_splits(args.label_fraction, seed=args.seed)
    steps_per_epoch = len(splits.unlabelled) // 128
    rampup_steps = int(0.3 * args.epochs * steps_per_epoch)

    L.seed_everything(args.seed, verbose=False)
    baseline = fit(SupervisedOnly(), splits, args.epochs, args.seed)
    L.seed_everything(args.seed, verbose=False)
    model = MeanTeacherDigits(rampup_steps=rampup_steps, teacher_decay=args.teacher_decay)
    mean_teacher = fit(model, splits, args.epochs, args.seed)

    n_labelled, n_train = len(splits.labelled), len(splits.unlabelled)
    rows = {
        "supervised only (baseline)": baseline.curve("val_acc"),
        "mean teacher: student": mean_teacher.curve("val_acc_student"),
        "mean teacher: teacher": mean_teacher.curve("val_acc_teacher"),
    }
    steps = mean_teacher.steps[-1]
    print(
        f"validation accuracy on {len(splits.val)} digits after {args.epochs} epochs ({steps} optimizer steps), "
        f"{n_labelled} of {n_train} training labels used:"
    )
    print(f"  {'run':<28} {'final':>6} {'best':>6}")
    for name, curve in rows.items():
        print(f"  {name:<28} {curve[-1]:6.4f} {max(curve):6.4f}")
    title = f"Digits with {n_labelled} of {n_train} labels ({args.label_fraction:.0%})"
    plot(baseline, mean_teacher, title, args.out)
    print(f"plot written to {args.out}")
    return {
        "baseline_acc": rows["supervised only (baseline)"][-1],
        "student_acc": rows["mean teacher: student"][-1],
        "teacher_acc": rows["mean teacher: teacher"][-1],
        "steps": float(steps),
    }


if __name__ == "__main__":
    main()
