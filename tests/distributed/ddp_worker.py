"""Train TinyClassifier with EMACallback under a DDP strategy and dump what each rank holds.

Used in-process by the ``ddp_fork`` test and as a script (``python ddp_worker.py STRATEGY OUT``) for
``ddp_spawn`` and ``ddp``, which must not run inside pytest. Each rank writes ``rank{r}.pt`` with its EMA, its
raw weights and (rank 0 only matters) the raw weights recorded after every optimizer step.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import TinyClassifier, WeightRecorder, make_loader, snapshot, trainer_kwargs

from lightning_ema import EMACallback

DECAY = 0.8


class DumpRankState(L.Callback):
    def __init__(self, out: Path, recorder: WeightRecorder, ema: EMACallback) -> None:
        self.out = out
        self.recorder = recorder
        self.ema = ema

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(
            {
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "num_updates": self.ema.num_updates,
                "ema": {k: v.clone() for k, v in self.ema.ema_state_dict().items()},
                "raw": snapshot(pl_module),
                "initial": self.recorder.initial,
                "initial_step": self.recorder.initial_step,
                "steps": self.recorder.steps,
                "states": self.recorder.states,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def run(strategy: str, out: str | Path, *, max_epochs: int = 3, ckpt_path: str | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    recorder = WeightRecorder()
    ema = EMACallback(decay=DECAY, every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, every_n_epochs=1, save_last=True)
    trainer = L.Trainer(
        callbacks=[recorder, ema, DumpRankState(out, recorder, ema), checkpoint],
        max_epochs=max_epochs,
        **trainer_kwargs(strategy=strategy, devices=2, enable_checkpointing=True),
    )
    trainer.fit(TinyClassifier(), make_loader(), ckpt_path=ckpt_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("out")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--ckpt-path")
    args = parser.parse_args()
    run(args.strategy, args.out, max_epochs=args.max_epochs, ckpt_path=args.ckpt_path)
