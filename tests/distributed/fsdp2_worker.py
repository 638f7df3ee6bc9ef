"""Train a small FSDP2-sharded model (ModelParallelStrategy, 2 CPU processes) with EMACallback; dump each rank.

``python fsdp2_worker.py OUT [--max-epochs N] [--ckpt-path P] [--single-file]``. Layers: ``net.0`` shards evenly,
``net.2`` (5 rows over 2 ranks) unevenly, and the root's ``head`` (1 row) leaves rank 1 an empty shard. Each rank
writes ``rank{r}.pt``: its EMA shards, the FULL weights after every optimizer step (gathered for the reference),
and the full weights seen inside validation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ema import EMACallback

DECAY = 0.8


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # type: ignore[no-any-return]


class ShardedNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
        self.head = nn.Linear(5, 1)
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.net(x)))

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx == 0:  # every rank gathers: a collective before the forward
            self.seen_in_validation.append({n: full(p).detach().clone() for n, p in self.named_parameters()})
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Record(L.Callback):
    """Before the EMACallback: the full weights at train start and after every optimizer step (all ranks gather)."""

    def __init__(self) -> None:
        self.initial_step = 0
        self.initial: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.initial_step = trainer.global_step
        self.initial = {n: full(p).detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.steps.append(trainer.global_step)
        self.states.append({n: full(p).detach().clone() for n, p in pl_module.named_parameters()})


class Dump(L.Callback):
    def __init__(self, out: Path, record: Record, ema: EMACallback) -> None:
        self.out, self.record, self.ema = out, record, ema

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        torch.save(
            {
                "global_step": trainer.global_step,
                "num_updates": self.ema.num_updates,
                "ema": {k: v.clone() for k, v in self.ema.ema_state_dict().items()},
                "initial": self.record.initial,
                "initial_step": self.record.initial_step,
                "steps": self.record.steps,
                "states": self.record.states,
                "seen_in_validation": pl_module.seen_in_validation,
                "raw": {n: full(p).detach().clone() for n, p in pl_module.named_parameters()},
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--ckpt-path")
    parser.add_argument("--single-file", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    record, ema = Record(), EMACallback(decay=DECAY)
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not args.single_file
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=args.max_epochs,
        callbacks=[record, ema, Dump(out, record, ema), ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        ShardedNet(),
        DataLoader(data, batch_size=8),
        DataLoader(data, batch_size=16),
        ckpt_path=args.ckpt_path,
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
