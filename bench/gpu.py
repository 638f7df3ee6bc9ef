"""Tables G1 and G2, only where a CUDA device is present: the update on the GPU and what it adds to a training step.

G1: one update of a ResNet-50 layout (float32, and bfloat16 weights with a float32 EMA) as a fraction of the
device's bandwidth: the bytes the update must move over its time, against a large ``copy_`` measured in the same
run, and against one flat ``lerp_``. G2: step time of a plain CUDA training loop with no EMA, with lightning-ema's
default (check and skip on the device), with a side stream, with ``nonfinite="ignore"`` and offloaded to the CPU
(``device="cpu"``: pinned memory, non-blocking copies), as multiples of the flat ``lerp_`` time of the model.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .common import ALPHA, DECAY, Config, Report, Step, averaged_numel, build_model, counter, fmt_ms, fmt_ratio, log
from .common import table as markdown_table
from .peers import Peer


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Step, device: torch.device, calls: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the wall time of ``calls`` back-to-back calls (device work included), per call."""
    for _ in range(3):  # warm-up: kernel selection, allocator, first-call copies of some peers
        fn()
    _synchronize(device)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) / calls)
    return sorted(samples)[len(samples) // 2]


def _ema_step(module: nn.Module, **kwargs: Any) -> tuple[Step, Any]:
    from lightning_ema import EMA

    model_ema = EMA(module, DECAY, **kwargs)
    next_step = counter()
    return (lambda: model_ema.update(next_step())), model_ema


def run_gpu_update(peers: dict[str, Peer], config: Config, report: Report, device: torch.device) -> None:
    log("gpu: update ...")
    module = build_model("many", config.quick).to(device)
    numel = averaged_numel(module)
    calls = 5 if config.quick else 50
    source, target = torch.randn(4 * numel, device=device), torch.empty(4 * numel, device=device)
    copy_s = time_per_call(lambda: target.copy_(source), device, calls)
    copy_bandwidth = 8 * 4 * numel / copy_s
    ema, weight = torch.randn(numel, device=device), torch.randn(numel, device=device)
    cases: dict[str, tuple[Step, float]] = {
        "flat `lerp_` over the same number of elements": (lambda: ema.lerp_(weight, ALPHA), 12)
    }
    cases["lightning-ema default (check and skip on the device)"] = (_ema_step(module)[0], 12)
    cases["lightning-ema, nonfinite='ignore'"] = (_ema_step(module, nonfinite="ignore")[0], 12)
    live = [t for t in module.state_dict().values() if t.is_floating_point()]
    emas = [t.clone() for t in live]
    cases["bare `torch._foreach_lerp_`"] = (lambda: torch._foreach_lerp_(emas, live, ALPHA), 12)
    if not peers["timm"].error:
        timm = peers["timm"].module.ModelEmaV3(module, decay=DECAY)
        next_step = counter()
        cases["timm `ModelEmaV3`"] = (lambda: timm.update(module, step=next_step()), 12)
    bf16 = build_model("many", config.quick).to(device=device, dtype=torch.bfloat16)
    cases["lightning-ema, bf16 weights / float32 EMA (default)"] = (_ema_step(bf16)[0], 10)
    cases["lightning-ema, bf16 weights / float32 EMA, nonfinite='ignore'"] = (
        _ema_step(bf16, nonfinite="ignore")[0],
        10,
    )
    flat_s = time_per_call(cases["flat `lerp_` over the same number of elements"][0], device, calls)
    rows = []
    for name, (fn, nbytes) in cases.items():
        seconds = time_per_call(fn, device, calls)
        bandwidth = nbytes * numel / seconds
        report.results.setdefault("gpu_update", {})[name] = seconds / flat_s
        rows.append(
            [
                name,
                fmt_ms(seconds * 1e3),
                f"{bandwidth / 1e9:.0f} GB/s",
                f"{bandwidth / copy_bandwidth:.0%}",
                fmt_ratio(seconds / flat_s),
            ]
        )
    report.emit()
    report.emit(f"## G1. Update on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")
    report.emit()
    report.emit(
        f"ResNet-50 layout, {numel / 1e6:.2f}M averaged elements. Bandwidth = the bytes the update must move (12 per "
        "element, 10 for a float32 EMA of bf16 weights) over its time; the fraction is of a large device `copy_` "
        f"measured in the same run ({copy_bandwidth / 1e9:.0f} GB/s, read + write). Medians of 5 rounds of {calls} "
        "back-to-back calls, the device synchronised at the end of each round only."
    )
    report.emit()
    report.emit(markdown_table(["update", "ms", "bandwidth", "of device copy", "x flat lerp"], rows))
    cases.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mlp(width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*layers).to(device)


def run_gpu_steps(config: Config, report: Report, device: torch.device) -> None:
    log("gpu: training steps ...")
    width, depth, batch = (256, 2, 64) if config.quick else (4096, 8, 256)
    steps = 5 if config.quick else 60
    configurations: dict[str, Callable[[nn.Module], Step | None]] = {
        "none": lambda m: None,
        "lightning-ema default": lambda m: _ema_step(m)[0],
        "lightning-ema default, side stream": lambda m: _side_stream_step(m),
        "lightning-ema, nonfinite='ignore'": lambda m: _ema_step(m, nonfinite="ignore")[0],
        "lightning-ema, device='cpu' (pinned offload)": lambda m: _ema_step(m, device="cpu")[0],
    }
    times = {}
    numel = 0
    for name, make in configurations.items():
        model = _mlp(width, depth, device)
        numel = averaged_numel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        x = torch.randn(batch, width, device=device)
        update = make(model)

        def step(
            model: nn.Module = model, optimizer: Any = optimizer, x: torch.Tensor = x, update: Any = update
        ) -> None:
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if update is not None:
                update()

        times[name] = time_per_call(step, device, steps)
        del model, optimizer, update
        gc.collect()
    ema, weight = torch.randn(numel, device=device), torch.randn(numel, device=device)
    flat = time_per_call(lambda: ema.lerp_(weight, ALPHA), device, steps)
    rows = []
    for name, seconds in times.items():
        overhead = seconds - times["none"]
        if name == "none":
            rows.append([name, fmt_ms(seconds * 1e3), "-", "-"])
            continue
        report.results.setdefault("gpu_steps", {})[name] = overhead / flat
        rows.append([name, fmt_ms(seconds * 1e3), f"{overhead * 1e3:+.3f} ms", fmt_ratio(overhead / flat)])
    report.emit()
    report.emit("## G2. Step overhead on the GPU (plain training loop, fused AdamW)")
    report.emit()
    report.emit(
        f"MLP of {depth} blocks of width {width} ({numel / 1e6:.1f}M parameters), batch {batch}; step time over "
        f"{steps} back-to-back steps (synchronised at the end only). Flat `lerp_` over the model's elements: "
        f"{fmt_ms(flat * 1e3)} ms."
    )
    report.emit()
    report.emit(markdown_table(["EMA", "step ms", "overhead", "overhead / flat lerp"], rows))


def _side_stream_step(module: nn.Module) -> Step:
    step, model_ema = _ema_step(module)
    model_ema.use_side_stream()
    return step
