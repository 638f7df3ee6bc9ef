"""What every benchmark module shares: timing, formatting, the benchmark models, the run's settings.

Times are medians of round-robin repetitions (every case once per round, the order rotated each round), so that a
change in the machine's speed during a table hits all its cases alike; they are reported as ratios to the
bandwidth limit measured in the same run (one flat ``lerp_`` over as many contiguous float32 elements).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
def quiet_stderr() -> Iterator[None]:
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
def lightning_module_class() -> type:
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
    wrapped_class = lightning_module_class()
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


@dataclass
class Config:
    """The sizes, repetitions and time budgets of one run (full or ``--quick``)."""

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
        budgets = {"many": 4, "few": 2, "diagnosis": 2, "swap": 2, "variants": 3, "gpu": 3}
        return Config(True, 5, budgets, 3, 4, 16, {"width": 128, "depth": 2, "features": 64}, 10)
    budgets = {"many": 60, "few": 40, "diagnosis": 25, "swap": 15, "variants": 30, "gpu": 30}
    return Config(False, 51, budgets, 41, 10, 32, {"width": 1024, "depth": 4, "features": 512}, 30)


def wait_for_idle(limit_s: float, threshold: float = 0.5) -> None:
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        log(f"waiting for an idle machine: 1-minute load average {os.getloadavg()[0]:.2f}")
        time.sleep(15)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Report:
    """The markdown being written (also echoed to stdout) and the figures the target table needs."""

    lines: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def emit(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, path: str) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(self.lines) + "\n")
        log(f"wrote {target}")


def counter() -> Callable[[], int]:
    """1, 2, 3, ... on successive calls (optimizer step numbers)."""
    state = {"step": 0}

    def next_step() -> int:
        state["step"] += 1
        return state["step"]

    return next_step


def unavailable(error: BaseException) -> str:
    return f"unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
