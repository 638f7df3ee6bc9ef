"""Table 2: a validation swap (EMA into the model, raw weights back), its time and the memory it allocates."""

from __future__ import annotations

import copy
import gc
from types import SimpleNamespace

import torch
from torch import nn

from .common import (
    DECAY,
    Config,
    Report,
    Step,
    build_model,
    fmt_bytes,
    fmt_ms,
    log,
    median_ms,
    peak_extra_bytes,
    table,
    timed_round_robin,
)
from .peers import Peer


def swap_cases(module: nn.Module, peers: dict[str, Peer], bf16: nn.Module | None) -> dict[str, tuple[Step, str]]:
    from lightning_ema import EMA

    cases: dict[str, tuple[Step, str]] = {}
    model_ema = EMA(module, DECAY)
    model_ema.update(1)

    def lightning_ema_swap() -> None:
        model_ema.swap_in()
        model_ema.swap_out()

    cases["lightning-ema `swap_in` + `swap_out`"] = (lightning_ema_swap, "")
    if bf16 is not None:
        model_ema_bf16 = EMA(bf16, DECAY)
        model_ema_bf16.update(1)

        def lightning_ema_swap_bf16() -> None:
            model_ema_bf16.swap_in()
            model_ema_bf16.swap_out()

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


def run_swap(peers: dict[str, Peer], config: Config, report: Report) -> None:
    log("swap ...")
    module = build_model("many", config.quick)
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
        report.results.setdefault("swap", {})[name] = (ms, peak)
        rows.append([name, fmt_ms(ms), fmt_ms(min(samples[name]) * 1e3), fmt_bytes(peak)])
    intact = all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    report.emit()
    report.emit("## 2. Validation swap: EMA in and raw weights back (ResNet-50 layout)")
    report.emit()
    report.emit(
        f"One swap in plus one swap back; model state {fmt_bytes(model_bytes)}. Extra memory = peak bytes of "
        "tensors allocated during the swap and alive at once, from the CPU allocator's events under "
        f"`torch.profiler(profile_memory=True)`. Raw weights restored bit-exactly afterwards: {intact}. "
        f"Medians of {len(next(iter(samples.values())))} round-robin repetitions."
    )
    report.emit()
    report.emit(table(["method", "median ms", "min ms", "extra peak memory"], rows))
    del bf16, cases, runnable
    gc.collect()
