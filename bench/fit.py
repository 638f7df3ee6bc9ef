"""Tables 3 and 3b: what the EMA adds to a real ``Trainer.fit`` step, against the ideal update in the same hook."""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .common import (
    _EVICT_BYTES,
    ALPHA,
    DECAY,
    Config,
    Report,
    Step,
    averaged_numel,
    counter,
    flat_reference,
    fmt_ms,
    fmt_ratio,
    log,
    median_ms,
    table,
    timed_cold,
    timed_round_robin,
)
from .peers import Peer


def e2e_model_class() -> type:
    import lightning.pytorch as pl
    import torch.nn.functional as F

    class MLP(pl.LightningModule):
        """A ~5M-parameter MLP classifier (with LayerNorm), trained on random data."""

        def __init__(self, optimizer: str, width: int, depth: int, features: int) -> None:
            super().__init__()
            self.optimizer = optimizer
            blocks: list[nn.Module] = [nn.Linear(features, width)]
            for _ in range(depth):
                blocks += [nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()]
            blocks += [nn.LayerNorm(width), nn.Linear(width, 256)]
            self.net = nn.Sequential(*blocks)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if self.optimizer == "SGD":
                return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    return MLP


E2E_CONFIGS = (
    "none",
    "flat lerp",
    "log only",
    "lightning-ema",
    "lightning-ema (nonfinite='ignore')",
    "EMAWeightAveraging",
)


@dataclass
class FitTimes:
    steps: dict[str, list[float]] = field(default_factory=dict)
    hooks: dict[str, list[float]] = field(default_factory=dict)


def run_fit(model_class: type, optimizer: str, config: Config) -> FitTimes:
    """One ``Trainer.fit`` in which the configurations take turns in blocks of consecutive optimizer steps.

    Every configuration's callback is in the Trainer from the start (so each EMA is bound and kept as usual),
    but its ``on_train_batch_end`` only runs during its own blocks. Blocks of ``config.e2e_block`` steps cycle
    through the configurations (the order rotated every cycle) for ``config.e2e_cycles`` cycles, so a slow
    patch of the machine hits all of them alike. The first step of each block is not counted: it can carry
    after-effects (cache contents) of the previous block's configuration; the following steps carry those of
    their own. The first cycle is a warm-up and not counted either.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ema import EMACallback

    names = list(E2E_CONFIGS)
    block = config.e2e_block
    steps = block * len(names) * config.e2e_cycles
    times = FitTimes({name: [] for name in names}, {name: [] for name in names})
    state = {"active": "none", "index": -1, "start": 0.0, "hook": 0.0}

    def schedule(index: int) -> str:
        cycle, position = divmod(index // block, len(names))
        return names[(position + cycle) % len(names)]

    def counted(index: int) -> bool:
        return index >= block * len(names) and index % block != 0

    class StepTimer(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            now = time.perf_counter()
            if state["index"] >= 0 and counted(state["index"]):
                times.steps[state["active"]].append(now - state["start"])
            state["index"] += 1
            state["active"] = schedule(state["index"])
            state["start"] = now

    class HookStart(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            state["hook"] = time.perf_counter()

    class HookEnd(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            if counted(state["index"]):
                times.hooks[state["active"]].append(time.perf_counter() - state["hook"])

    class LogOnly(Callback):
        """What EMACallback logs after each update, without the update."""

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            pl_module.log("ema/decay", DECAY, on_step=True, on_epoch=False, batch_size=1)

    class FlatLerp(Callback):
        """The ideal update at the same point of the step: one flat lerp_ over as many contiguous elements."""

        def __init__(self, numel: int) -> None:
            self.ema = torch.randn(numel)
            self.weight = torch.randn(numel)

        def on_train_batch_end(self, *args: Any) -> None:
            self.ema.lerp_(self.weight, ALPHA)

    def gated(name: str, callback: Callback) -> Callback:
        hook = callback.on_train_batch_end

        def on_train_batch_end(*args: Any, **kwargs: Any) -> None:
            if state["active"] == name:
                hook(*args, **kwargs)

        callback.on_train_batch_end = on_train_batch_end  # type: ignore[method-assign]
        return callback

    torch.manual_seed(0)
    model = model_class(optimizer, config.e2e_dims["width"], config.e2e_dims["depth"], config.e2e_dims["features"])
    under_test = {
        "flat lerp": FlatLerp(averaged_numel(model)),
        "log only": LogOnly(),
        "lightning-ema": EMACallback(decay=DECAY),
        # A different decay only to give the second EMACallback its own state key (and evaluate="raw", as two
        # callbacks may not both swap for validation, which this fit does not run); it costs the same.
        "lightning-ema (nonfinite='ignore')": EMACallback(decay=0.99991, nonfinite="ignore", evaluate="raw"),
        "EMAWeightAveraging": EMAWeightAveraging(decay=DECAY),
    }
    callbacks = [StepTimer(), HookStart(), *(gated(name, cb) for name, cb in under_test.items()), HookEnd()]
    batch, features = config.e2e_batch, config.e2e_dims["features"]
    x = torch.randn((steps + 1) * batch, features)
    y = torch.randint(0, 256, ((steps + 1) * batch,))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    gc.collect()
    gc.disable()
    try:
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False))
    finally:
        gc.enable()
    return times


# ---------------------------------------------------------------------------------------------- main


def e2e_pieces(model_class: type, dims: dict[str, int], peers: dict[str, Peer]) -> dict[str, Step]:
    """The update paths of the end-to-end table, outside the Trainer, on a model of the same shape."""
    from lightning_ema import EMA

    model = model_class("SGD", dims["width"], dims["depth"], dims["features"])
    numel = averaged_numel(model)
    pieces: dict[str, Step] = {"flat `lerp_` (bandwidth limit)": flat_reference(numel)}
    for label, kwargs in (("", {}), (", nonfinite='ignore'", {"nonfinite": "ignore"})):
        model_ema = EMA(model, DECAY, **kwargs)
        next_step = counter()
        pieces[f"lightning-ema `update(step)`{label}"] = lambda e=model_ema, c=next_step: e.update(c())
    lightning = peers["lightning"]
    if not lightning.error:
        callback = lightning.module.EMAWeightAveraging(decay=DECAY)
        callback.setup(None, model, "fit")
        callback.on_train_batch_end(SimpleNamespace(global_step=1), model, None, None, 0)
        pieces["`EMAWeightAveraging` update (`AveragedModel.update_parameters`)"] = lambda: (
            callback._average_model.update_parameters(model)
        )
    for step in pieces.values():
        step()
    return pieces


def run_e2e(peers: dict[str, Peer], config: Config, report: Report) -> None:
    log("end to end ...")
    model_class = e2e_model_class()
    dims = config.e2e_dims
    pieces = e2e_pieces(model_class, dims, peers)
    flat_name = next(iter(pieces))
    cold: dict[str, list[float]] = {name: [] for name in pieces}
    warm: dict[str, list[float]] = {name: [] for name in pieces}

    def measure_pieces() -> None:
        for name, values in timed_cold(pieces, config.flat_reps).items():
            cold[name] += values
        for name, values in timed_round_robin(pieces, config.flat_reps).items():
            warm[name] += values

    measure_pieces()
    fits: dict[str, FitTimes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for optimizer in ("SGD", "Adam"):
            log(f"  fit: {optimizer}, {config.e2e_cycles} cycles x {len(E2E_CONFIGS)} configurations")
            fits[optimizer] = run_fit(model_class, optimizer, config)
    measure_pieces()
    numel = averaged_numel(model_class("SGD", dims["width"], dims["depth"], dims["features"]))
    flat = median_ms(cold[flat_name])
    report.emit()
    report.emit(f"## 3. End-to-end step time in `Trainer.fit` ({numel / 1e6:.2f}M-parameter MLP)")
    report.emit()
    report.emit(
        f"Batch {config.e2e_batch}. One `Trainer.fit` per optimizer in which the configurations take turns in "
        f"blocks of {config.e2e_block} consecutive steps, {config.e2e_cycles} cycles (the first a warm-up; the "
        "first step of each block, which carries the previous block's after-effects, is not counted): "
        f"{(config.e2e_cycles - 1) * (config.e2e_block - 1)} steps per configuration and optimizer. Every "
        "callback is in the Trainer from the start; outside its blocks its `on_train_batch_end` is skipped. "
        "Step time = interval between consecutive `on_train_batch_start` calls (forward, backward, optimizer, "
        "all hooks). "
        "Hook = time inside the callback's `on_train_batch_end`, less the 'none' row's hook time (Lightning's "
        "dispatch to the skipped callbacks between the two timers). Calibration rows: 'flat lerp' is a callback "
        "doing the ideal update at that point (one flat `lerp_` over as many contiguous elements as the model "
        "has); 'log only' makes just the `self.log('ema/decay', ...)` call that EMACallback makes after each "
        "update. Bandwidth limit of the model's "
        f"EMA bytes = flat `lerp_` over {numel / 1e6:.2f}M elements with a cold cache, as after a training "
        f"step (same run, table 3b): **{fmt_ms(flat)} ms**."
    )
    report.emit()
    rows = []
    for optimizer in ("SGD", "Adam"):
        times = fits[optimizer]
        base = median_ms(times.steps["none"])
        # Lightning's dispatch to the skipped callbacks between the two timers, paid by every configuration.
        hook_base = median_ms(times.hooks["none"])
        for ema in E2E_CONFIGS:
            step = median_ms(times.steps[ema])
            hook = median_ms(times.hooks[ema]) - (0.0 if ema == "none" else hook_base)
            if ema == "none":
                rows.append([optimizer, ema, fmt_ms(step), "-", fmt_ms(hook), "-", "-"])
                continue
            overhead = step - base
            report.results.setdefault("e2e", {})[(optimizer, ema)] = (overhead / flat, hook / flat, overhead / base)
            rows.append(
                [
                    optimizer,
                    ema,
                    fmt_ms(step),
                    f"{overhead:+.2f} ms ({100 * overhead / base:+.1f}%)",
                    fmt_ms(hook),
                    fmt_ratio(overhead / flat),
                    fmt_ratio(hook / flat),
                ]
            )
    report.emit(
        table(
            [
                "optimizer",
                "EMA",
                "median step ms",
                "step overhead vs none",
                "hook ms",
                "overhead / bandwidth limit",
                "hook / bandwidth limit",
            ],
            rows,
        )
    )
    report.emit()
    report.emit("### 3b. The same update paths outside the Trainer (same model shape)")
    report.emit()
    report.emit(
        f"Cold: a {_EVICT_BYTES // 2**20} MiB buffer is overwritten (untimed) before each call, so the tensors "
        "come from memory as in training; warm: calls back to back. Medians of "
        f"{len(cold[flat_name])} repetitions each."
    )
    report.emit()
    piece_rows = []
    for name in pieces:
        cold_ms, warm_ms = median_ms(cold[name]), median_ms(warm[name])
        piece_rows.append([name, fmt_ms(cold_ms), fmt_ratio(cold_ms / flat), fmt_ms(warm_ms)])
    report.emit(table(["update path", "cold ms", "x cold flat lerp", "warm ms"], piece_rows))
    report.results["e2e_flat"] = flat
