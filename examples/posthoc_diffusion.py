"""Post-hoc EMA on a small denoising diffusion model: choose the EMA length after training.

    python examples/posthoc_diffusion.py          # about 35 s on two CPU cores
    python examples/posthoc_diffusion.py --fast   # a few seconds: a smoke test, numbers meaningless

A DDPM-style noise-prediction MLP learns scikit-learn's two moons (generated locally, no download). One run
with ``PostHocEMA(sigma_rels=(0.05, 0.10))`` snapshots both power-function EMAs every ``--snapshot-every`` steps;
in the same run an ``EMACallback`` tracks further power-function EMAs directly, as references. After training:

1. ``PostHocEMA.sweep`` synthesises the EMA of every width of a grid and validates each with a Trainer: the
   validation samples 4,000 points from the model and logs ``val_swd``, the sliced Wasserstein distance between
   them and 4,000 held-out points (lower is better). The raw weights and the two tracked EMAs are validated too.
2. For each directly tracked width, the synthesised EMA is compared with it:
   ``||synthesised - tracked|| / ||tracked - raw||`` over the averaged tensors (raw: the final raw weights).

It prints both tables and saves a two-panel plot (``--plot``, default ``docs/posthoc_diffusion.png``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import make_moons
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ema import EMACallback, PostHocEMA
from lightning_ema.posthoc import reconstruction_error, synthesize
from lightning_ema.schedules import KarrasDecay

TRACKED = (0.05, 0.10)
#: widths tracked directly in the same run, to measure the synthesis error in and out of the tracked range
CHECKS = (0.02, 0.03, 0.04, 0.06, 0.07, 0.085, 0.13, 0.16, 0.2, 0.25)
GRID = (0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.085, 0.10, 0.13, 0.16, 0.2, 0.25, 0.28)


class MoonsDataModule(L.LightningDataModule):
    """Two moons, standardised; a training set and a held-out set drawn with other seeds."""

    def __init__(self, n_train: int = 8000, n_val: int = 4000, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        train, _ = make_moons(n_samples=hp.n_train, noise=0.06, random_state=hp.seed)
        held_out, _ = make_moons(n_samples=hp.n_val, noise=0.06, random_state=hp.seed + 1)
        train_t = torch.tensor(train, dtype=torch.float32)
        self.mean, self.std = train_t.mean(dim=0), train_t.std(dim=0)
        self.train_set = TensorDataset((train_t - self.mean) / self.std)
        self.val_set = TensorDataset((torch.tensor(held_out, dtype=torch.float32) - self.mean) / self.std)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set))


def time_embedding(t: Tensor, dim: int = 32) -> Tensor:
    frequencies = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2))
    angles = t[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MoonsDiffusion(L.LightningModule):
    """An MLP predicting the noise of a DDPM with a cosine schedule; validation samples and scores the samples."""

    def __init__(self, hidden: int = 128, diffusion_steps: int = 100, lr: float = 3e-3, samples: int = 4000) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(2 + 32, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )
        steps = torch.arange(diffusion_steps + 1, dtype=torch.float64) / diffusion_steps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)
        self.held_out: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, time_embedding(t.float() / self.hparams.diffusion_steps)], dim=1))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (x0,) = batch
        t = torch.randint(0, self.hparams.diffusion_steps, (len(x0),))
        noise = torch.randn_like(x0)
        a = self.alpha_bar[t][:, None]
        loss = nn.functional.mse_loss(self(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), noise)
        self.log("train_loss", loss)
        return loss

    @torch.no_grad()
    def sample(self, n: int, seed: int = 1234) -> Tensor:
        """Ancestral DDPM sampling with a fixed noise sequence, so that weight sets are compared on equal terms."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 2, generator=generator)
        for step in reversed(range(self.hparams.diffusion_steps)):
            t = torch.full((n,), step)
            beta, a = self.betas[step], self.alpha_bar[step]
            mean = (x - beta / (1 - a).sqrt() * self(x, t)) / (1 - beta).sqrt()
            x = mean + beta.sqrt() * torch.randn(n, 2, generator=generator) if step else mean
        return x

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.held_out.append(batch[0])

    def on_validation_epoch_end(self) -> None:
        held_out = torch.cat(self.held_out)
        self.held_out.clear()
        self.log("val_swd", sliced_wasserstein(self.sample(self.hparams.samples), held_out))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> Tensor:
    """Sliced 2-Wasserstein distance between two equally large point sets, over fixed random directions."""
    angles = torch.rand(projections, generator=torch.Generator().manual_seed(seed)) * math.pi
    directions = torch.stack([angles.cos(), angles.sin()], dim=1)
    n = min(len(a), len(b))
    pa = (a[:n] @ directions.T).sort(dim=0).values
    pb = (b[:n] @ directions.T).sort(dim=0).values
    return ((pa - pb) ** 2).mean().sqrt()


def relative_error(synthesised: dict[str, Tensor], tracked: dict[str, Tensor], raw: dict[str, Tensor]) -> float:
    """``||synthesised - tracked|| / ||tracked - raw||`` over the averaged (floating) tensors."""
    names = [name for name, tensor in tracked.items() if tensor.is_floating_point()]
    numerator = sum(float(((synthesised[n].double() - tracked[n].double()) ** 2).sum()) for n in names)
    denominator = sum(float(((tracked[n].double() - raw[n].double()) ** 2).sum()) for n in names)
    return math.sqrt(numerator / denominator)


def validate_with(
    trainer: L.Trainer, model: MoonsDiffusion, data: MoonsDataModule, weights: dict[str, Tensor]
) -> float:
    raw = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(weights, strict=False)
    try:
        trainer.validate(model, datamodule=data, verbose=False)
    finally:
        model.load_state_dict(raw)
    return float(trainer.callback_metrics["val_swd"])


def plot(
    path: str,
    sweep: dict[float, dict[str, float]],
    marks: dict[str, float],
    errors: dict[float, tuple[float, float]],
    steps: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    widths = sorted(sweep)
    for axis in (left, right):
        axis.axvspan(min(TRACKED), max(TRACKED), color="tab:green", alpha=0.08, label="tracked range")
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(FixedLocator([0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.28]))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("sigma_rel")
        axis.grid(alpha=0.3, which="both")
    left.plot(widths, [sweep[w]["val_swd"] for w in widths], "o-", color="tab:blue", label="synthesised post hoc")
    left.plot(
        list(TRACKED),
        [marks[f"tracked {w}"] for w in TRACKED],
        "s",
        color="tab:green",
        ms=10,
        label="tracked EMAs (snapshotted)",
    )
    left.axhline(marks["raw"], color="tab:red", ls="--", label="raw weights")
    left.set_ylabel("sliced Wasserstein distance to held-out data")
    left.set_title(f"Sample quality against EMA length ({steps} steps, one run)")
    left.legend(loc="upper left", fontsize=8)
    checks = sorted(errors)
    right.plot(
        checks,
        [errors[w][0] for w in checks],
        "o-",
        color="tab:purple",
        label="||synthesised - tracked|| / ||tracked - raw||",
    )
    right.plot(checks, [errors[w][1] for w in checks], "x--", color="tab:gray", label="relative profile error")
    right.axhline(0.05, color="tab:red", ls=":", label="5%")
    right.set_yscale("log")
    right.set_ylim(1e-7, 0.2)  # room for the legend below the curves
    right.set_ylabel("relative error")
    right.set_title("Synthesis against EMAs tracked directly")
    right.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    parser.add_argument("--snapshot-every", type=int, default=100, help="snapshot every this many steps")
    parser.add_argument("--samples", type=int, default=4000, help="points sampled per validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="out/posthoc_diffusion", help="default_root_dir (snapshots, logs)")
    parser.add_argument("--plot", default="docs/posthoc_diffusion.png")
    parser.add_argument("--fast", action="store_true", help="a smoke test: 300 steps, 500 samples, fewer widths")
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.snapshot_every, args.samples = 300, 15, 500
    grid = GRID[::3] if args.fast else GRID
    started = time.perf_counter()

    L.seed_everything(args.seed, verbose=False)
    root = Path(args.root)
    shutil.rmtree(root / "posthoc_ema", ignore_errors=True)  # this example's snapshots of an earlier run
    data = MoonsDataModule(n_val=args.samples, seed=args.seed)
    model = MoonsDiffusion(samples=args.samples)
    posthoc = PostHocEMA(sigma_rels=TRACKED, snapshot_every_n_steps=args.snapshot_every, distance_every_n_steps=0)
    direct = EMACallback(decay=[KarrasDecay(sigma_rel=s) for s in CHECKS], evaluate="raw", distance_every_n_steps=0)
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[posthoc, direct],
        default_root_dir=root,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    trained = time.perf_counter()

    # One Trainer for every evaluation; the sweep logs posthoc/val_swd per sigma_rel to its CSV logger.
    evaluator = L.Trainer(
        accelerator="cpu",
        default_root_dir=root,
        logger=CSVLogger(root, name="sweep"),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    sweep = posthoc.sweep(evaluator, model, grid, datamodule=data, max_error=None)
    raw = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    marks = {"raw": validate_with(evaluator, model, data, raw)}
    for index, sigma in enumerate(TRACKED):
        marks[f"tracked {sigma}"] = validate_with(evaluator, model, data, posthoc.ema_state_dict(index))
    errors = {}
    for index, sigma in enumerate(CHECKS):
        synthesised = synthesize(posthoc.snapshot_dir(), sigma, max_error=None)
        errors[sigma] = (
            relative_error(synthesised, direct.ema_state_dict(index), raw),
            reconstruction_error(posthoc.snapshot_dir(), sigma),
        )
    finished = time.perf_counter()

    snapshots = sorted(posthoc.snapshot_dir().glob("step-*"))
    size = snapshots[-1].stat().st_size
    print(
        f"{args.steps} optimizer steps, {len(snapshots)} snapshots of sigma_rel {TRACKED} ({size / 1024:.0f} KiB each)"
    )
    print(f"training {trained - started:.0f} s, synthesis and evaluation {finished - trained:.0f} s")
    print("\nsample quality (sliced Wasserstein distance to held-out data, lower is better):")
    print("| weights | sigma_rel | SWD | relative profile error |")
    print("| --- | --- | --- | --- |")
    print(f"| raw | - | {marks['raw']:.4f} | - |")
    for sigma in TRACKED:
        print(f"| tracked EMA | {sigma} | {marks[f'tracked {sigma}']:.4f} | 0 |")
    best = min(sweep, key=lambda s: sweep[s]["val_swd"])
    for sigma in sorted(sweep):
        mark = " (best)" if sigma == best else ""
        row = sweep[sigma]
        print(f"| synthesised{mark} | {sigma} | {row['val_swd']:.4f} | {row['reconstruction_error']:.2e} |")
    print("\nsynthesis against EMAs tracked directly in the same run (tracked range 0.05 to 0.10):")
    print("| sigma_rel | in range | ||synth - tracked|| / ||tracked - raw|| | relative profile error |")
    print("| --- | --- | --- | --- |")
    for sigma in CHECKS:
        inside = "yes" if min(TRACKED) <= sigma <= max(TRACKED) else "no"
        print(f"| {sigma} | {inside} | {errors[sigma][0]:.1e} ({errors[sigma][0]:.3%}) | {errors[sigma][1]:.2e} |")
    plot(args.plot, sweep, marks, errors, args.steps)
    print(f"\nplot written to {args.plot}")
    return {"sweep": sweep, "marks": marks, "errors": errors, "snapshots": len(snapshots), "snapshot_bytes": size}


if __name__ == "__main__":
    main()
