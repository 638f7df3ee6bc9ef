"""Train with PostHocEMA on 2 CPU processes and dump what each rank saw: ``python posthoc_worker.py MODE OUT``.

``MODE`` is ``ddp`` (TinyClassifier, ``strategy="ddp"``: Lightning relaunches this script for rank 1) or ``fsdp2``
(fsdp2_worker's ShardedNet under ModelParallelStrategy, data_parallel_size=2). Snapshots go to ``OUT/snapshots``
every 4 steps; each rank writes ``rank{r}.pt`` with the weights recorded after every optimizer step (full weights
under FSDP2, gathered for the reference only).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
import torch
from support import TinyClassifier, WeightRecorder, make_loader, trainer_kwargs

from lightning_ema import PostHocEMA

SIGMAS = (0.05, 0.10)
EVERY = 4


class Dump(L.Callback):
    def __init__(self, out: Path, recorder: L.Callback) -> None:
        self.out, self.recorder = out, recorder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        recorder = self.recorder
        torch.save(
            {
                "world_size": trainer.world_size,
                "initial": recorder.initial,  # type: ignore[attr-defined]
                "steps": recorder.steps,  # type: ignore[attr-defined]
                "states": recorder.states,  # type: ignore[attr-defined]
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ddp", "fsdp2"])
    parser.add_argument("out")
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    posthoc = PostHocEMA(SIGMAS, snapshot_every_n_steps=EVERY, dirpath=out / "snapshots", file_format="torch")
    if args.mode == "ddp":
        recorder: L.Callback = WeightRecorder()
        trainer = L.Trainer(
            callbacks=[recorder, posthoc, Dump(out, recorder)],
            max_epochs=args.max_epochs,
            **trainer_kwargs(strategy="ddp", devices=2),
        )
        trainer.fit(TinyClassifier(), make_loader())
        return
    from fsdp2_worker import Record, ShardedNet
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    recorder = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=args.max_epochs,
        callbacks=[recorder, posthoc, Dump(out, recorder)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ShardedNet(), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
