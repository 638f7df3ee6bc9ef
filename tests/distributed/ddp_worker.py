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
from torch import nn

from lightning_ema import EMACallback, MeanTeacherModule

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


class DumpTestWeights(L.Callback):
    """Dumps the weights each rank tests with (put it after the EMACallback, which swaps in `on_test_start`)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(snapshot(pl_module), self.out / f"test{trainer.global_rank}.pt")


def run(
    strategy: str,
    out: str | Path,
    *,
    max_epochs: int = 3,
    ckpt_path: str | None = None,
    check_handover: bool = False,
) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    recorder = WeightRecorder()
    ema = EMACallback(decay=DECAY, every_n_steps=2)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, every_n_epochs=1, save_last=True)
    trainer = L.Trainer(
        callbacks=[recorder, ema, DumpRankState(out, recorder, ema), checkpoint, DumpTestWeights(out)],
        max_epochs=max_epochs,
        **trainer_kwargs(strategy=strategy, devices=2, enable_checkpointing=True),
    )
    model = TinyClassifier()
    trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
    if check_handover and trainer.global_rank == 0:
        # In the process that called `fit` (the main process under spawn and fork launchers).
        torch.save(
            {
                "num_updates": ema.num_updates,
                "ema": {k: v.clone() for k, v in ema.ema_state_dict().items()},
                "raw": snapshot(model),
            },
            out / "main.pt",
        )
    if check_handover:
        trainer.test(model, make_loader())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("out")
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--ckpt-path")
    parser.add_argument("--check-handover", action="store_true")
    args = parser.parse_args()
    run(
        args.strategy,
        args.out,
        max_epochs=args.max_epochs,
        ckpt_path=args.ckpt_path,
        check_handover=args.check_handover,
    )


class TinyMeanTeacher(MeanTeacherModule):
    """TinyClassifier's network as the student; a consistency term against the teacher on the same batch."""

    def __init__(self) -> None:
        super().__init__(teacher_decay=DECAY)
        self.student = TinyClassifier().net

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        with torch.no_grad():
            target = self.teacher(x).softmax(dim=1)
        logits = self.student(x)
        return nn.functional.cross_entropy(logits, y) + nn.functional.mse_loss(logits.softmax(dim=1), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class DumpTeacher(L.Callback):
    """Records the student after every step (rank 0's is the reference) and dumps each rank's teacher."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.recorder = WeightRecorder()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = snapshot(pl_module.student)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.recorder.steps.append(trainer.global_step)
        self.recorder.states.append(snapshot(pl_module.student))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the module's own on_train_end, where every rank takes rank 0's teacher buffers
        torch.save(
            {
                "teacher": snapshot(pl_module.teacher),
                "num_updates": pl_module.num_teacher_updates,
                "initial": self.initial,
                "steps": self.recorder.steps,
                "states": self.recorder.states,
            },
            self.out / f"teacher{trainer.global_rank}.pt",
        )


def run_mean_teacher(strategy: str, out: str | Path, *, max_epochs: int = 2) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    trainer = L.Trainer(
        callbacks=[DumpTeacher(out)], max_epochs=max_epochs, **trainer_kwargs(strategy=strategy, devices=2)
    )
    trainer.fit(TinyMeanTeacher(), make_loader())
