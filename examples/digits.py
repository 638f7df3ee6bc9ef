"""Train a small classifier on scikit-learn's bundled digits with an EMA of its weights.

    python examples/digits.py            # about half a minute on two CPU cores
    python examples/digits.py --compare  # raw and two EMAs validated in one run, plotted to docs/

Prints the validation accuracy of the raw weights and of the EMA weights. With ``--compare``, one run keeps
two EMAs (``decay=[0.99, 0.995]``), validates raw and both EMAs every 15 steps (``evaluate="both"``) and
saves a plot of validation accuracy over steps. No download: the 1,797 8x8 digit images ship with
scikit-learn.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_ema import EMACallback
from lightning_ema.schedules import WarmupDecay


class DigitsDataModule(L.LightningDataModule):
    """The 8x8 digits, scaled to [0, 1], split 80/20 with a fixed seed."""

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
        n_val = int(len(x) * self.hparams.val_fraction)
        self.val_set = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train_set = TensorDataset(x[order[n_val:]], y[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(L.LightningModule):
    """A two-layer perceptron trained with plain SGD at a high learning rate, where an EMA helps most."""

    def __init__(self, hidden: int = 128, lr: float = 0.5, dropout: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)
        )
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ValidationHistory(L.Callback):
    """Collects every logged validation metric after each validation (the sanity check excluded)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.steps.append(trainer.global_step)
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val_acc"):
                self.values.setdefault(name, []).append(float(value))


def compare(epochs: int, seed: int, plot: str) -> dict[str, float]:
    """Validate raw weights and two EMAs in one run; plot validation accuracy over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L.seed_everything(seed, verbose=False)
    history = ValidationHistory()
    ema = EMACallback(decay=[0.99, 0.995], evaluate="both")
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[ema, history],
        val_check_interval=15,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule(seed=seed))

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = {"val_acc": "raw weights", "val_acc_ema0.99": "EMA, decay 0.99", "val_acc_ema0.995": "EMA, decay 0.995"}
    for name, label in labels.items():
        axis.plot(history.steps, history.values[name], label=label)
    axis.set(xlabel="optimizer step", ylabel="validation accuracy", ylim=(0.85, 1.0))
    axis.set_title("Digits: raw and EMA weights validated in one run (evaluate='both')")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(plot, dpi=120)
    final = {name: values[-1] for name, values in history.values.items()}
    print(f"validation accuracy after {epochs} epochs ({trainer.global_step} optimizer steps), one run:")
    for name, label in labels.items():
        print(f"  {label:>17}: {final[name]:.4f}")
    print(f"plot written to {plot}")
    return final


@torch.no_grad()
def evaluate(model: DigitsClassifier, loader: DataLoader) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy) of ``model`` on ``loader``."""
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in loader:
        logits = model(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        total += len(y)
    return correct / total, loss / total


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="validate raw and two EMAs in one run and plot")
    parser.add_argument("--plot", default="docs/digits_ema.png", help="where --compare saves its plot")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.epochs, args.seed, args.plot)

    L.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(seed=args.seed)
    model = DigitsClassifier()
    ema = EMACallback(decay=WarmupDecay(decay=args.decay, warmup=10))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[ema],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)

    val_loader = data.val_dataloader()
    raw_acc, raw_loss = evaluate(model, val_loader)
    with ema.swapped(model):
        ema_acc, ema_loss = evaluate(model, val_loader)
    print(f"validation after {args.epochs} epochs ({trainer.global_step} optimizer steps, EMA decay {args.decay}):")
    print(f"  raw weights: accuracy {raw_acc:.4f}  loss {raw_loss:.4f}")
    print(f"  EMA weights: accuracy {ema_acc:.4f}  loss {ema_loss:.4f}")
    return {"raw_acc": raw_acc, "ema_acc": ema_acc, "raw_loss": raw_loss, "ema_loss": ema_loss}


if __name__ == "__main__":
    main()
