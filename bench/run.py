"""Benchmark lightning-ema's EMA update, swap and training overhead against its peers and the bandwidth limit.

Run ``python bench/run.py`` (full, about 5-6 minutes on 2 cores) or ``python bench/run.py --quick`` (a small
configuration for smoke testing, under a minute). Every figure is the median of many repetitions; the
methods of one table are timed round-robin (one call of each per round, the order rotated every round) so
that a change in machine speed during the run hits them all alike. Times are reported as ratios to the
bandwidth limit measured in the same run: one flat in-place ``lerp_`` of a contiguous float32 EMA towards a
contiguous float32 weight with as many elements as the model averages (it reads 8 and writes 4 bytes per
element, which is what every EMA update must move at least).

See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

DECAY = 0.9999
MIN_REPS = 5
_EVICT_BYTES = 128 * 2**20  # more than the last-level cache of the machines this runs on
ALPHA = 1.0 - DECAY
Step = Callable[[], None]


# ---------------------------------------------------------------------------------------------- helpers
_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def timed_round_robin(
    cases: dict[str, Step], reps: int, per_call: dict[str, int] | None = None, budget_s: float | None = None
) -> dict[str, list[float]]:
    """Time each case ``reps`` times, one call of every case per round, rotating the order each round.

    ``per_call`` divides a case's time by the number of optimizer steps one call covers. ``budget_s`` stops
    starting new rounds once that many seconds have passed (after at least ``MIN_REPS`` rounds), so that a
    slow or busy machine still finishes in bounded time; the tables say how many rounds ran.
    """
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    started = time.perf_counter()
    try:
        for rep in range(reps):
            if budget_s is not None and rep >= MIN_REPS and time.perf_counter() - started > budget_s:
                break
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                cases[name]()
                elapsed = time.perf_counter() - start
                samples[name].append(elapsed / (per_call or {}).get(name, 1))
    finally:
        gc.enable()
    return samples


def flat_reference(numel: int) -> Step:
    """One flat in-place ``lerp_`` over ``numel`` contiguous float32 elements: the bandwidth limit of an EMA update."""
    ema = torch.randn(numel)
    weight = torch.randn(numel)
    return lambda: ema.lerp_(weight, ALPHA)


def timed_cold(cases: dict[str, Step], reps: int) -> dict[str, list[float]]:
    """Like :func:`timed_round_robin`, but each call first finds its tensors out of the cache.

    Before every timed call a buffer larger than the last-level cache is overwritten (untimed), as a
    training step's forward and backward passes do before the EMA update runs.
    """
    evict = torch.empty(_EVICT_BYTES // 4)
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                evict.fill_(1.0)
                start = time.perf_counter()
                cases[name]()
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def averaged_numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())


def count_tensors(module: nn.Module) -> tuple[int, int]:
    state = module.state_dict()
    return len(state), sum(1 for _ in module.parameters())


def peak_extra_bytes(fn: Step) -> int:
    """Peak bytes of tensors alive during ``fn`` that were allocated by it (CPU allocator events).

    Runs ``fn`` once under ``torch.profiler`` with ``profile_memory=True`` and replays the allocator's
    ``[memory]`` events (+bytes on allocation, -bytes on release) in time order; the maximum of the
    running sum is the peak of extra tensor memory. Tensors that ``fn`` allocates and keeps count too.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if event.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines, which go to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def fmt_bytes(value: float) -> str:
    if value == 0:
        return "0 B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- models
def _lightning_module_class() -> type:
    import lightning.pytorch as pl

    class Wrapped(pl.LightningModule):
        """A LightningModule holding a network, so that Lightning's callbacks accept it."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    return Wrapped


class Bottleneck(nn.Module):
    """A ResNet bottleneck block (1x1, 3x3, 1x1 convolutions with batch norm)."""

    def __init__(self, inplanes: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if downsample
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet50_like(base: int = 64) -> nn.Module:
    """A ResNet-50 layout: 25.6M parameters in 161 parameter tensors, 320 ``state_dict`` tensors at base 64."""
    layers: list[nn.Module] = [nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base)]
    inplanes = base
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = base * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(Bottleneck(inplanes, width, stride, downsample=block == 0))
            inplanes = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, 1000)]
    return nn.Sequential(*layers)


def few_large(rows: int = 4096, cols: int = 1536, count: int = 4) -> nn.Module:
    """``count`` large weight matrices (4 x 4096 x 1536 = 25.2M parameters at the defaults); never run forward."""
    return nn.ModuleList(nn.Linear(cols, rows, bias=False) for _ in range(count))


def build_model(kind: str, quick: bool) -> nn.Module:
    torch.manual_seed(0)
    wrapped_class = _lightning_module_class()
    if kind == "many":
        net = resnet50_like(base=8 if quick else 64)
    else:
        net = few_large(rows=512, cols=192) if quick else few_large()
    module = wrapped_class(net)
    # Give every averaged buffer a non-trivial value, as after some training.
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + (0.5 if "var" in name else 0.0))
    return module


# ---------------------------------------------------------------------------------------------- peers
@dataclass
class Peer:
    name: str
    package: str
    module: Any = None
    version: str = "-"
    error: str | None = None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _load_file_module(package: str, relative: str, alias: str) -> Any:
    """Load one module file of ``package`` without running the package's ``__init__`` (which may need torchvision)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    file_spec = importlib.util.spec_from_file_location(alias, path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[alias] = module
    file_spec.loader.exec_module(module)
    return module


def load_peers() -> dict[str, Peer]:
    peers: dict[str, Peer] = {}

    def attempt(key: str, package: str, loader: Callable[[], Any]) -> None:
        peer = Peer(key, package, version=_version(package))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peer.module = loader()
        except Exception as error:
            peer.error = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        peers[key] = peer

    def timm_loader() -> Any:
        try:
            return importlib.import_module("timm.utils.model_ema")
        except ModuleNotFoundError as error:
            if error.name != "torchvision":
                raise
            return _load_file_module("timm", "utils/model_ema.py", "_bench_timm_model_ema")

    attempt("lightning", "lightning", lambda: importlib.import_module("lightning.pytorch.callbacks"))
    attempt("torch", "torch", lambda: importlib.import_module("torch.optim.swa_utils"))
    attempt("timm", "timm", timm_loader)
    attempt("ema_pytorch", "ema-pytorch", lambda: importlib.import_module("ema_pytorch"))
    attempt("torch_ema", "torch-ema", lambda: importlib.import_module("torch_ema"))
    attempt("diffusers", "diffusers", lambda: importlib.import_module("diffusers.training_utils"))
    return peers


# ---------------------------------------------------------------------------------------------- update cases
@dataclass
class Case:
    name: str
    averages: str
    make: Callable[[nn.Module], Step]
    peer: str | None = None
    calls_per_step: int = 1


def _counter() -> Callable[[], int]:
    state = {"step": 0}

    def next_step() -> int:
        state["step"] += 1
        return state["step"]

    return next_step


def _in_turn(steps: list[Step]) -> Step:
    def step() -> None:
        for each in steps:
            each()

    return step


def lightning_ema_case(decay: Any = DECAY, **kwargs: Any) -> Callable[[nn.Module], Step]:
    def make(module: nn.Module) -> Step:
        from lightning_ema import EMA

        averager = EMA(module, decay, **kwargs)
        next_step = _counter()
        n = averager.config.every_n_steps

        def step() -> None:
            for _ in range(n):
                averager.update(next_step())

        return step

    return make


def update_cases(peers: dict[str, Peer]) -> list[Case]:
    def lightning_ema_weight_averaging(module: nn.Module) -> Step:
        callback = peers["lightning"].module.EMAWeightAveraging(decay=DECAY)
        callback.setup(None, module, "fit")
        next_step = _counter()
        return lambda: callback.on_train_batch_end(SimpleNamespace(global_step=next_step()), module, None, None, 0)

    def torch_averaged_model(module: nn.Module) -> Step:
        swa = peers["torch"].module
        averaged = swa.AveragedModel(module, multi_avg_fn=swa.get_ema_multi_avg_fn(DECAY), use_buffers=True)
        return lambda: averaged.update_parameters(module)

    def timm_v3(module: nn.Module) -> Step:
        ema = peers["timm"].module.ModelEmaV3(module, decay=DECAY)
        next_step = _counter()
        return lambda: ema.update(module, step=next_step())

    def ema_pytorch(foreach: bool) -> Callable[[nn.Module], Step]:
        def make(module: nn.Module) -> Step:
            ema = peers["ema_pytorch"].module.EMA(
                module, beta=DECAY, update_after_step=0, update_every=1, use_foreach=foreach
            )
            return ema.update

        return make

    def torch_ema(module: nn.Module) -> Step:
        ema = peers["torch_ema"].module.ExponentialMovingAverage(module.parameters(), decay=DECAY)
        return ema.update

    def diffusers(foreach: bool) -> Callable[[nn.Module], Step]:
        def make(module: nn.Module) -> Step:
            ema = peers["diffusers"].module.EMAModel(module.parameters(), decay=DECAY, foreach=foreach)
            return lambda: ema.step(module.parameters())

        return make

    def bare_foreach(module: nn.Module) -> Step:
        live = [t for t in module.state_dict().values() if t.is_floating_point()]
        ema = [t.detach().clone() for t in live]
        return lambda: torch._foreach_lerp_(ema, live, ALPHA)

    all_floats = "params + float buffers"
    return [
        Case("lightning-ema `EMA.update` (nonfinite='error', default)", all_floats, lightning_ema_case()),
        Case(
            "lightning-ema `EMA.update` (nonfinite='ignore')",
            all_floats,
            lightning_ema_case(nonfinite="ignore"),
        ),
        Case("Lightning `EMAWeightAveraging`", "params + all buffers", lightning_ema_weight_averaging, "lightning"),
        Case("torch `AveragedModel` + `get_ema_multi_avg_fn`", "params + all buffers", torch_averaged_model, "torch"),
        Case("timm `ModelEmaV3`", "params + float buffers", timm_v3, "timm"),
        Case("ema-pytorch `EMA` (use_foreach=True)", all_floats, ema_pytorch(True), "ema_pytorch"),
        Case("ema-pytorch `EMA` (default, per tensor)", all_floats, ema_pytorch(False), "ema_pytorch"),
        Case("torch-ema `ExponentialMovingAverage`", "params", torch_ema, "torch_ema"),
        Case("diffusers `EMAModel` (default, per tensor)", "params", diffusers(False), "diffusers"),
        Case("diffusers `EMAModel` (foreach=True)", "params", diffusers(True), "diffusers"),
        Case("reference: bare `torch._foreach_lerp_` over the same tensors", all_floats, bare_foreach),
    ]


def run_update_table(
    module: nn.Module,
    cases: list[Case],
    peers: dict[str, Peer],
    reps: int,
    budget_s: float,
    reference_name: str = "flat",
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every available case on ``module`` plus the flat reference; return samples and unavailable reasons."""
    steps: dict[str, Step] = {reference_name: flat_reference(averaged_numel(module))}
    per_call: dict[str, int] = {}
    unavailable: dict[str, str] = {}
    for case in cases:
        peer = peers.get(case.peer) if case.peer else None
        if peer is not None and peer.error:
            unavailable[case.name] = f"unavailable ({peer.package}: {peer.error})"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = case.make(module)
                for _ in range(3):  # the first calls of some peers copy instead of averaging
                    step()
        except Exception as error:
            unavailable[case.name] = f"unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
            continue
        steps[case.name] = step
        per_call[case.name] = case.calls_per_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = timed_round_robin(steps, reps, per_call, budget_s)
    del steps
    gc.collect()
    return samples, unavailable


# ---------------------------------------------------------------------------------------------- swap
def swap_cases(module: nn.Module, peers: dict[str, Peer], bf16: nn.Module | None) -> dict[str, tuple[Step, str]]:
    from lightning_ema import EMA

    cases: dict[str, tuple[Step, str]] = {}
    averager = EMA(module, DECAY)
    averager.update(1)

    def lightning_ema_swap() -> None:
        averager.swap_in()
        averager.swap_out()

    cases["lightning-ema `swap_in` + `swap_out`"] = (lightning_ema_swap, "")
    if bf16 is not None:
        averager_bf16 = EMA(bf16, DECAY)
        averager_bf16.update(1)

        def lightning_ema_swap_bf16() -> None:
            averager_bf16.swap_in()
            averager_bf16.swap_out()

        cases["lightning-ema `swap_in` + `swap_out`, bf16 weights / f32 EMA (copy path)"] = (
            lightning_ema_swap_bf16,
            "",
        )
    lightning = peers["lightning"]
    if lightning.error:
        cases["Lightning `WeightAveraging._swap_models` x2"] = (lambda: None, f"unavailable ({lightning.error})")
    else:
        callback = lightning.module.EMAWeightAveraging(decay=DECAY)
        callback.setup(None, module, "fit")
        callback.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)

        def lightning_swap() -> None:
            callback._swap_models(module)
            callback._swap_models(module)

        cases["Lightning `WeightAveraging._swap_models` x2"] = (lightning_swap, "")
    torch_ema = peers["torch_ema"]
    if torch_ema.error:
        cases["torch-ema `average_parameters()` (store, copy_to, restore)"] = (
            lambda: None,
            f"unavailable ({torch_ema.error})",
        )
    else:
        ema = torch_ema.module.ExponentialMovingAverage(module.parameters(), decay=DECAY)
        ema.update()

        def torch_ema_swap() -> None:
            with ema.average_parameters():
                pass
            ema.collected_params = None  # let the stored copy go, as a fresh context would

        cases["torch-ema `average_parameters()` (store, copy_to, restore)"] = (torch_ema_swap, "")
    return cases


# ---------------------------------------------------------------------------------------------- end to end
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
@dataclass
class Config:
    quick: bool
    reps: int  # repetitions per timing table (fewer if the table's time budget runs out first)
    budget_s: dict[str, float]  # seconds per table: many, few, diagnosis, swap, variants
    e2e_cycles: int  # cycles through all end-to-end configurations (the first is a warm-up)
    e2e_block: int  # consecutive optimizer steps per configuration and turn
    e2e_batch: int
    e2e_dims: dict[str, int]
    flat_reps: int


def make_config(quick: bool) -> Config:
    if quick:
        budgets = {"many": 4, "few": 2, "diagnosis": 2, "swap": 2, "variants": 3}
        return Config(True, 5, budgets, 3, 4, 16, {"width": 128, "depth": 2, "features": 64}, 10)
    budgets = {"many": 70, "few": 50, "diagnosis": 25, "swap": 15, "variants": 30}
    return Config(False, 51, budgets, 41, 10, 32, {"width": 1024, "depth": 4, "features": 512}, 30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small configuration for smoke testing (< 60 s)")
    parser.add_argument(
        "--out",
        default=None,
        help="write the markdown tables here (default bench/results.md; with --quick bench/results-quick.md, "
        "so that a smoke test does not overwrite the full run's results)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to fall below 0.5 (other work finished)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / ("results-quick.md" if args.quick else "results.md"))
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)

    # One thread count everywhere: torch's intra-op pool, and OMP_NUM_THREADS so that Lightning does not
    # choose its own.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    config = make_config(args.quick)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    out: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        out.append(text)

    log("loading peers ...")
    peers = load_peers()
    import lightning

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import lightning_ema

    emit(f"# lightning-ema benchmark{' (--quick)' if config.quick else ''}")
    emit()
    emit(
        f"torch {torch.__version__}, lightning {lightning.__version__}, lightning-ema {lightning_ema.__version__}, "
        f"Python {platform.python_version()}; CPU: {_cpu_name()}, {os.cpu_count()} cores; "
        f"torch threads = {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); "
        f"decay {DECAY}; each figure is a median over up to {config.reps} repetitions (the count per table is "
        "given with it)."
    )
    emit()
    emit("Peers:")
    emit()
    emit(
        table(
            ["package", "version", "status"],
            [[p.package, p.version, "ok" if not p.error else f"unavailable ({p.error})"] for p in peers.values()],
        )
    )
    results: dict[str, Any] = {}

    # ---------------------------------------------------------------- 1. update
    cases = update_cases(peers)
    for kind, label, title in (
        ("many", "1a", "ResNet-50 layout: 320 state tensors (161 parameters + BN buffers)"),
        ("few", "1b", "a few large tensors: 4 weight matrices"),
    ):
        log(f"update: {kind} ...")
        module = build_model(kind, config.quick)
        numel = averaged_numel(module)
        n_state, n_params = count_tensors(module)
        samples, unavailable = run_update_table(module, cases, peers, config.reps, config.budget_s[kind])
        flat = median_ms(samples["flat"])
        emit()
        emit(f"## {label}. Update time per optimizer step: {title}")
        emit()
        emit(
            f"{numel / 1e6:.2f}M averaged float32 elements in {n_state} state tensors ({n_params} parameters). "
            f"Bandwidth limit (one flat `lerp_` over {numel / 1e6:.2f}M contiguous elements, "
            f"{12 * numel / 2**20:.0f} MiB moved): **{fmt_ms(flat)} ms** "
            f"(= {12 * numel / (flat / 1e3) / 1e9:.1f} GB/s). Medians of {len(samples['flat'])} round-robin "
            "repetitions."
        )
        emit()
        rows = []
        for case in cases:
            if case.name in unavailable:
                rows.append([case.name, case.averages, "-", "-", unavailable[case.name]])
                continue
            ms = median_ms(samples[case.name])
            low = min(samples[case.name]) * 1e3
            rows.append([case.name, case.averages, fmt_ms(ms), fmt_ms(low), fmt_ratio(ms / flat)])
        emit(table(["method", "averages", "median ms", "min ms", "x bandwidth limit"], rows))
        results[kind] = {case.name: median_ms(samples[case.name]) / flat for case in cases if case.name in samples}
        del module, samples
        gc.collect()

    # ---------------------------------------------------------------- diagnosis
    log("diagnosis ...")
    module = build_model("many", config.quick)
    emit()
    pieces, reps = diagnose(module, config)
    emit("## 1c. Where lightning-ema's update time goes (ResNet-50 layout)")
    emit()
    emit(
        f"Each piece timed alone, round-robin ({reps} repetitions), over the same tensors as table 1a; ratios to "
        "this table's own flat `lerp_`. The pieces call lightning-ema's own kernels (`lightning_ema.functional`) "
        "on lists grouped as the averager groups them. The 'other' rows are not lightning-ema code: they time "
        "other one-read reductions over the same weights, for what a finiteness check could cost (a screen "
        "that may overflow needs an exact re-check of the tensors it flags)."
    )
    emit()
    emit(
        table(
            ["piece", "median ms", "x bandwidth limit"],
            [
                [name, "-", value] if isinstance(value, str) else [name, fmt_ms(value[0]), fmt_ratio(value[1])]
                for name, value in pieces.items()
            ],
        )
    )

    # ---------------------------------------------------------------- 2. swap
    log("swap ...")
    run_swap(module, peers, config, emit, results)

    # ---------------------------------------------------------------- 3. end to end
    log("end to end ...")
    run_e2e(config, emit, results, peers)

    # ---------------------------------------------------------------- 4. variants
    log("variants ...")
    results["variants"] = run_variants(module, peers, config, emit)
    del module
    gc.collect()

    # ---------------------------------------------------------------- targets
    emit()
    emit("## Targets")
    emit()
    emit(table(["target", "measured", "met?"], targets(results)))
    elapsed = time.perf_counter() - started
    emit()
    emit(
        f"Total benchmark time {elapsed:.0f} s. 1-minute load average {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (above ~{args.threads} means other processes competed for the "
        "cores and the absolute times are noisy; the ratios are taken within one run and suffer less)."
    )
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(out) + "\n")
        log(f"wrote {path}")
    return 0


def wait_for_idle(limit_s: float, threshold: float = 0.5) -> None:
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        log(f"waiting for an idle machine: 1-minute load average {os.getloadavg()[0]:.2f}")
        time.sleep(15)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def diagnose(module: nn.Module, config: Config) -> tuple[dict[str, tuple[float, float] | str], int]:
    """Time the pieces of lightning-ema's update path separately.

    The pieces run lightning-ema's own kernels (``lightning_ema.functional``) on lists built here the way the
    averager groups them (floating-point tensors averaged, integer buffers copied), so the table does not
    depend on the averager's private attributes.
    """
    from lightning_ema import EMA
    from lightning_ema import functional as F

    state = list(module.state_dict().values())
    live = [t for t in state if t.is_floating_point()]
    ema = [t.detach().clone() for t in live]
    counters = [t for t in state if not t.is_floating_point()]
    counters_ema = [t.clone() for t in counters]
    averager = EMA(module, DECAY)
    schedule = averager.schedule
    interval = _counter()
    flat_name = "flat `lerp_` (bandwidth limit)"
    candidates: dict[str, Step] = {
        flat_name: flat_reference(averaged_numel(module)),
        "full `update(step)`, nonfinite='error' (default)": lambda: averager.update(interval()),
        "nonfinite check: `F.nonfinite_mask(weights).any()` (lightning-ema's check)": lambda: bool(
            F.nonfinite_mask(live).any()
        ),
        "lerp: `F.lerp_` (`_foreach_lerp_`)": lambda: F.lerp_(ema, live, ALPHA),
        "integer buffers: `F.copy_` (`_foreach_copy_`)": lambda: F.copy_(counters_ema, counters),
        "schedule: `interval_decay` + `schedule(step)`": lambda: (schedule.interval_decay(5, 5), schedule(5)),
        "other check: `_foreach_norm(ord=inf)` (one read, exact)": lambda: torch._foreach_norm(live, float("inf")),
        "other check: per-tensor `aminmax` (one read, exact)": lambda: [torch.aminmax(t) for t in live],
        "other check: `_foreach_max` (one read; NaN and +inf only)": lambda: torch._foreach_max(live),
        "other screen: `_foreach_norm(ord=2)` (one read; may overflow)": lambda: torch._foreach_norm(live, 2),
        "other screen: per-tensor `sum` (one read; may overflow)": lambda: [t.sum() for t in live],
    }
    pieces: dict[str, Step] = {}
    failed: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            fn()
            pieces[name] = fn
        except Exception as error:  # the package's internals may move; say so instead of failing the run
            failed[name] = f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:100]})"
    samples = timed_round_robin(pieces, config.reps, budget_s=config.budget_s["diagnosis"])
    base = median_ms(samples[flat_name])
    result: dict[str, tuple[float, float] | str] = {}
    for name in candidates:
        if name in failed:
            result[name] = failed[name]
        else:
            ms = median_ms(samples[name])
            result[name] = (ms, ms / base)
    return result, len(samples[flat_name])


KDECAYS = (0.99, 0.999, 0.9999)
KDECAYS_ONE = "decay=[0.99, 0.999, 0.9999]: three EMAs in one callback (default check)"
KDECAYS_MANY = "three separate callbacks' updates, decays 0.99, 0.999, 0.9999 (default check)"


def run_variants(module: nn.Module, peers: dict[str, Peer], config: Config, emit: Callable[[str], None]) -> dict:
    numel = averaged_numel(module)
    bf16 = copy.deepcopy(module).to(torch.bfloat16)
    flat_name = "flat f32 `lerp_`"
    steps: dict[str, Step] = {flat_name: flat_reference(numel)}
    per_call: dict[str, int] = {}
    # name: (module, EMA arguments, least bytes per element and optimizer step such an update moves)
    variants: dict[str, tuple[nn.Module, dict[str, Any], float]] = {
        "default (EMA with the weights)": (module, {}, 12),
        "device='cpu' (offload; on this CPU-only machine the same placement as the default)": (
            module,
            {"device": "cpu"},
            12,
        ),
        "bf16 weights, float32 EMA (dtype=None)": (bf16, {}, 10),
        "bf16 weights, float32 EMA, nonfinite='ignore'": (bf16, {"nonfinite": "ignore"}, 10),
        "every_n_steps=4 (cost per optimizer step, amortised)": (module, {"every_n_steps": 4}, 3),
        "every_n_steps=4, nonfinite='ignore' (per optimizer step)": (
            module,
            {"every_n_steps": 4, "nonfinite": "ignore"},
            3,
        ),
        "decay=[0.999, 0.9999]: two EMAs in one update (nonfinite='ignore')": (
            module,
            {"decay": [0.999, DECAY], "nonfinite": "ignore"},
            20,
        ),
        KDECAYS_ONE: (module, {"decay": list(KDECAYS)}, 28),
        KDECAYS_MANY: (module, {"decay": list(KDECAYS)}, 28),
    }
    failed: dict[str, str] = {}
    for name, (target, kwargs, _) in variants.items():
        try:
            if name == KDECAYS_MANY:  # what k EMACallbacks do per step: k updates, each checking and reading
                step = _in_turn([lightning_ema_case(decay)(target) for decay in KDECAYS])
            else:
                step = lightning_ema_case(**kwargs)(target)
            step()
        except Exception as error:
            failed[name] = f"unavailable ({type(error).__name__}: {str(error).splitlines()[0][:100]})"
            continue
        steps[name] = step
        per_call[name] = kwargs.get("every_n_steps", 1)
    timm = peers["timm"]
    timm_name = "peer: timm `ModelEmaV3(dtype=torch.float32)`, bf16 weights"
    least_bytes = {name: spec[2] for name, spec in variants.items()}
    least_bytes[timm_name] = 10
    if not timm.error:
        ema = timm.module.ModelEmaV3(bf16, decay=DECAY, dtype=torch.float32)
        counter = _counter()
        steps[timm_name] = lambda: ema.update(bf16, step=counter())
        steps[timm_name]()
    samples = timed_round_robin(steps, config.reps, per_call, config.budget_s["variants"])
    flat = median_ms(samples[flat_name])
    rows = []
    ratios: dict[str, float] = {}
    for name in least_bytes:
        if name not in samples:
            rows.append([name, "-", "-", "-", "-", failed.get(name, f"unavailable ({timm.error})")])
            continue
        ms = median_ms(samples[name])
        limit = flat * least_bytes[name] / 12
        ratios[name] = ms / limit
        rows.append(
            [name, fmt_ms(ms), f"{least_bytes[name]:g}", fmt_ms(limit), fmt_ratio(ms / limit), fmt_ratio(ms / flat)]
        )
    emit()
    emit("## 4. lightning-ema variants (ResNet-50 layout)")
    emit()
    emit(
        f"Flat f32 `lerp_` over {numel / 1e6:.2f}M elements (12 bytes/element): {fmt_ms(flat)} ms, medians of "
        f"{len(samples[flat_name])} round-robin repetitions. Each variant's bandwidth limit is that time scaled "
        "to the least bytes per element and optimizer step it must move: 10 for a float32 EMA of bf16 weights "
        "(read 4 + 2, write 4), 3 for an update every 4th step, 20 for two EMAs sharing one read of the weights, "
        "28 for three. The last two rows compare k decays in one callback with k callbacks (the same three EMAs)."
    )
    emit()
    emit(
        table(
            ["variant", "median ms / step", "bytes/elem", "limit ms", "x its limit", "x f32 flat lerp"],
            rows,
        )
    )
    return ratios


def run_swap(
    module: nn.Module, peers: dict[str, Peer], config: Config, emit: Callable[[str], None], results: dict
) -> None:
    bf16 = copy.deepcopy(module).to(torch.bfloat16)
    cases = swap_cases(module, peers, bf16)
    runnable = {name: fn for name, (fn, error) in cases.items() if not error}
    samples = timed_round_robin(runnable, config.reps, budget_s=config.budget_s["swap"])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rows = []
    for name, (fn, error) in cases.items():
        if error:
            rows.append([name, "-", "-", error])
            continue
        peak = peak_extra_bytes(fn)
        ms = median_ms(samples[name])
        results.setdefault("swap", {})[name] = (ms, peak)
        rows.append([name, fmt_ms(ms), fmt_ms(min(samples[name]) * 1e3), fmt_bytes(peak)])
    intact = all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    emit()
    emit("## 2. Validation swap: EMA in and raw weights back (ResNet-50 layout)")
    emit()
    emit(
        f"One swap in plus one swap back; model state {fmt_bytes(model_bytes)}. Extra memory = peak bytes of "
        "tensors allocated during the swap and alive at once, from the CPU allocator's events under "
        f"`torch.profiler(profile_memory=True)`. Raw weights restored bit-exactly afterwards: {intact}. "
        f"Medians of {len(next(iter(samples.values())))} round-robin repetitions."
    )
    emit()
    emit(table(["method", "median ms", "min ms", "extra peak memory"], rows))
    del bf16, cases, runnable
    gc.collect()


def e2e_pieces(model_class: type, dims: dict[str, int], peers: dict[str, Peer]) -> dict[str, Step]:
    """The update paths of the end-to-end table, outside the Trainer, on a model of the same shape."""
    from lightning_ema import EMA

    model = model_class("SGD", dims["width"], dims["depth"], dims["features"])
    numel = averaged_numel(model)
    pieces: dict[str, Step] = {"flat `lerp_` (bandwidth limit)": flat_reference(numel)}
    for label, kwargs in (("", {}), (", nonfinite='ignore'", {"nonfinite": "ignore"})):
        averager = EMA(model, DECAY, **kwargs)
        counter = _counter()
        pieces[f"lightning-ema `update(step)`{label}"] = lambda a=averager, c=counter: a.update(c())
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


def run_e2e(config: Config, emit: Callable[[str], None], results: dict, peers: dict[str, Peer]) -> None:
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
    emit()
    emit(f"## 3. End-to-end step time in `Trainer.fit` ({numel / 1e6:.2f}M-parameter MLP)")
    emit()
    emit(
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
    emit()
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
            results.setdefault("e2e", {})[(optimizer, ema)] = (overhead / flat, hook / flat, overhead / base)
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
    emit(
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
    emit()
    emit("### 3b. The same update paths outside the Trainer (same model shape)")
    emit()
    emit(
        f"Cold: a {_EVICT_BYTES // 2**20} MiB buffer is overwritten (untimed) before each call, so the tensors "
        "come from memory as in training; warm: calls back to back. Medians of "
        f"{len(cold[flat_name])} repetitions each."
    )
    emit()
    piece_rows = []
    for name in pieces:
        cold_ms, warm_ms = median_ms(cold[name]), median_ms(warm[name])
        piece_rows.append([name, fmt_ms(cold_ms), fmt_ratio(cold_ms / flat), fmt_ms(warm_ms)])
    emit(table(["update path", "cold ms", "x cold flat lerp", "warm ms"], piece_rows))
    results["e2e_flat"] = flat


def targets(results: dict) -> list[list[str]]:
    rows = []
    default = "lightning-ema `EMA.update` (nonfinite='error', default)"
    ignore = "lightning-ema `EMA.update` (nonfinite='ignore')"
    for kind, limit, label in (("many", 1.2, "300-tensor"), ("few", 1.05, "large-tensor")):
        for name, short in ((default, "default"), (ignore, "nonfinite='ignore'")):
            ratio = results[kind].get(name)
            if ratio is None:
                continue
            rows.append(
                [
                    f"update <= {limit}x bandwidth limit, {label} model ({short})",
                    fmt_ratio(ratio),
                    _verdict(ratio <= limit, ratio / limit),
                ]
            )
    swap = results.get("swap", {}).get("lightning-ema `swap_in` + `swap_out`")
    if swap is not None:
        ms, peak = swap
        rows.append(["swap: no extra memory", fmt_bytes(peak), "met" if peak == 0 else "MISSED"])
        rows.append(["swap < 2 ms (300 tensors)", f"{fmt_ms(ms)} ms", _verdict(ms < 2.0, ms / 2.0)])
    for (optimizer, ema), (ratio, hook_ratio, _) in results.get("e2e", {}).items():
        if ema == "flat lerp":
            rows.append(
                [
                    f"(calibration: the ideal flat `lerp_` in the same hook, {optimizer})",
                    f"{fmt_ratio(ratio)} (hook alone {fmt_ratio(hook_ratio)})",
                    "-",
                ]
            )
        if not ema.startswith("lightning-ema"):
            continue
        rows.append(
            [
                f"end-to-end overhead <= 1.3x bandwidth limit ({optimizer}, {ema})",
                f"{fmt_ratio(ratio)} (hook alone {fmt_ratio(hook_ratio)})",
                _verdict(ratio <= 1.3, ratio / 1.3),
            ]
        )
    return rows


def _verdict(met: bool, factor: float) -> str:
    return "met" if met else f"MISSED by {100 * (factor - 1):.0f}%"


if __name__ == "__main__":
    sys.exit(main())
