"""Train with ``EMA`` in a Lightning Fabric loop on 2 CPU processes (gloo) and dump what each rank holds.

``python fabric_worker.py {ddp,fsdp2} OUT [--epochs N] [--save-after E] [--resume PATH]``. Fabric relaunches this
script once per rank. ``ddp`` trains TinyClassifier exactly as ``ddp_worker.py`` does under the Trainer (same
data, sampler, optimizer and EMA settings), so the two can be compared bit for bit. ``fsdp2`` shards a small
regression net with ``fully_shard`` through ``ModelParallelStrategy`` (``net.0`` even, ``net.2`` uneven, ``head``
leaves rank 1 an empty shard); each rank's EMA holds its own shards only. Each rank writes ``rank{r}.pt``: its EMA,
its raw weights and the weights after every optimizer step (FSDP2: the full ones, gathered for the reference).

Checkpoints: under DDP ``fabric.save(path, {"model", "optimizer", "ema", "epoch"})``. Under FSDP2 Fabric treats
every object other than the model and optimizers as metadata that rank 0 alone writes, so the shard-local EMA goes
to one file per rank next to Fabric's checkpoint instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from support import TinyClassifier, make_data, snapshot
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_ema import EMA

DECAY = 0.8  # ddp_worker.DECAY; every_n_steps=2 there too


class ShardedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.net(x)))


def parallelize(model: ShardedNet, device_mesh: Any) -> ShardedNet:
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    fully_shard(model.net[0], mesh=mesh)
    fully_shard(model.net[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter in full under its ``state_dict`` name (a collective under FSDP2: all ranks call it)."""
    return {
        name.removeprefix("_forward_module."): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def regression_data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=["ddp", "fsdp2"])
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-after", type=int, help="save a checkpoint after this many epochs")
    parser.add_argument("--resume", help="a checkpoint written by --save-after")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    sharded = args.strategy == "fsdp2"

    if sharded:
        from lightning.fabric.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()

    if sharded:
        model = fabric.setup_module(ShardedNet())
        optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        ema = EMA(model, DECAY)  # after setup: the parameters are DTensors, the EMA keeps this rank's shards
        loader = fabric.setup_dataloaders(regression_data())
        loss_of = nn.functional.mse_loss
    else:
        raw = TinyClassifier()
        model, optimizer = fabric.setup(raw, torch.optim.SGD(raw.parameters(), lr=0.1, momentum=0.9))
        ema = EMA(model, DECAY, every_n_steps=2)
        # The Trainer's sampler for a training loader (shuffled, seed 0, reseeded by epoch), so that both runs see
        # the same batches; setting the epoch by hand keeps the order right after a resume too.
        sampler = DistributedSampler(make_data(), fabric.world_size, fabric.global_rank, shuffle=True, seed=0)
        loader = DataLoader(make_data(), batch_size=8, sampler=sampler)
        loss_of = nn.functional.cross_entropy

    record = full_weights if sharded else snapshot
    start_epoch = 0
    if args.resume:
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "epoch": 0}
        if not sharded:
            state["ema"] = ema
        fabric.load(args.resume, state)
        start_epoch = state["epoch"]
        if sharded:
            ema.load_state_dict(torch.load(Path(args.resume) / f"ema-rank{fabric.global_rank}.pt", weights_only=True))

    initial, steps, states = record(model), [], []
    seen_in_evaluation = []
    model.train()
    for epoch in range(start_epoch, args.epochs):
        if not sharded:
            sampler.set_epoch(epoch)
        for x, y in loader:
            loss = loss_of(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            ema.update()
            steps.append(ema.step)
            states.append(record(model))
        # evaluation with the EMA: every rank swaps its shards in; the raw weights come back afterwards
        ema.take_rank_zero_buffers()
        model.eval()  # in train mode BatchNorm would move the swapped-in EMA's running statistics
        with ema.swapped(), torch.no_grad():
            seen_in_evaluation.append(record(model))
            model(next(iter(loader))[0])
        model.train()
        if args.save_after == epoch + 1:
            path = out / "checkpoint"
            if sharded:
                fabric.save(path, {"model": model, "optimizer": optimizer, "epoch": epoch + 1})
                fabric.barrier()
                torch.save(ema.state_dict(), path / f"ema-rank{fabric.global_rank}.pt")
            else:
                fabric.save(path, {"model": model, "optimizer": optimizer, "ema": ema, "epoch": epoch + 1})
    ema.take_rank_zero_buffers()
    torch.save(
        {
            "world_size": fabric.world_size,
            "num_updates": ema.num_updates,
            "step": ema.step,
            "ema": {name: t.clone() for name, t in ema.ema_state_dict().items()},
            "raw": record(model),
            "initial": initial,
            "initial_step": steps[0] - 1 if steps else ema.step,
            "steps": steps,
            "states": states,
            "seen_in_evaluation": seen_in_evaluation,
        },
        out / f"rank{fabric.global_rank}.pt",
    )
    # Fabric leaves the gloo process group up; torn down at interpreter exit, its threads can abort the process
    # ("terminate called without an active exception") after all the work is done.
    fabric.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
