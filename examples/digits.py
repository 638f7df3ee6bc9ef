"""Train a small classifier on scikit-learn's bundled digits with an EMA of its weights.

    python examples/digits.py            # about half a minute on two CPU cores

Prints the validation accuracy of the raw weights and of the EMA weights. No download: the 1,797 8x8
digit images ship with scikit-learn.
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
    args = parser.parse_args(argv)

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
