"""A Lightning Fabric training loop on scikit-learn's bundled digits, with an EMA of the weights kept by ``EMA``.

    python examples/fabric_loop.py                     # 5 to 25 s on two CPU cores
    python examples/fabric_loop.py --checkpoint run.ckpt

No callbacks in a Fabric loop: the loop calls ``ema.update()`` after each optimizer step and evaluates inside
``ema.swapped()``. Prints the validation accuracy and loss of the raw and of the EMA weights. With
``--checkpoint`` the model, optimizer and EMA are saved with ``fabric.save`` (``fabric.load`` restores all three).
No download: the 1,797 8x8 digit images ship with scikit-learn.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ema import EMA
from lightning_ema.schedules import WarmupDecay


def digits(seed: int, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """The 8x8 digits scaled to [0, 1], split into training and validation sets with a fixed seed."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    return TensorDataset(x[order[n_val:]], y[order[n_val:]]), TensorDataset(x[order[:n_val]], y[order[:n_val]])


def make_model(hidden: int = 128, dropout: float = 0.2) -> nn.Module:
    """A two-layer perceptron; trained with plain SGD at a high learning rate, where an EMA helps most."""
    return nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy) of ``model`` on ``loader``, in eval mode."""
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in loader:
        logits = model(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        total += len(y)
    model.train()
    return correct / total, loss / total


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--decay", type=float, default=0.995)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--checkpoint", help="save model, optimizer and EMA here with fabric.save at the end")
    args = parser.parse_args(argv)

    fabric = L.Fabric(accelerator=args.accelerator, devices=1)
    fabric.seed_everything(args.seed, verbose=False)
    train_set, val_set = digits(args.seed)
    train_loader, val_loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=256)
    )
    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=args.lr))
    ema = EMA(model, WarmupDecay(decay=args.decay, warmup=10))

    model.train()
    for _ in range(args.epochs):
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            ema.update()  # one call per optimizer step

    raw_acc, raw_loss = evaluate(model, val_loader)
    with ema.swapped():  # the EMA is in the model inside the block only
        ema_acc, ema_loss = evaluate(model, val_loader)
    if args.checkpoint:
        fabric.save(args.checkpoint, {"model": model, "optimizer": optimizer, "ema": ema, "epoch": args.epochs})
    print(f"validation after {args.epochs} epochs ({ema.step} optimizer steps, EMA decay {args.decay}):")
    print(f"  raw weights: accuracy {raw_acc:.4f}  loss {raw_loss:.4f}")
    print(f"  EMA weights: accuracy {ema_acc:.4f}  loss {ema_loss:.4f}")
    return {"raw_acc": raw_acc, "ema_acc": ema_acc, "raw_loss": raw_loss, "ema_loss": ema_loss, "steps": ema.step}


if __name__ == "__main__":
    main()
