"""Tables 1a-1c and 4: one optimizer step's EMA update, against the peers and against the bandwidth limit.

lightning-ema is timed through its public engine, ``lightning_ema.EMA.update(step)``: exactly what
``EMACallback.on_train_batch_end`` runs (the callback adds a ``log`` call on the steps the loggers write).
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .common import (
    ALPHA,
    DECAY,
    Config,
    Report,
    Step,
    averaged_numel,
    build_model,
    count_tensors,
    counter,
    flat_reference,
    fmt_ms,
    fmt_ratio,
    log,
    median_ms,
    table,
    timed_round_robin,
    unavailable,
)
from .peers import Case, Peer, peer_cases

DEFAULT = "lightning-ema `EMA.update` (nonfinite='error', default)"
IGNORE = "lightning-ema `EMA.update` (nonfinite='ignore')"


def lightning_ema_case(decay: Any = DECAY, **kwargs: Any) -> Callable[[nn.Module], Step]:
    """A step that calls ``EMA.update`` once per optimizer step (``every_n_steps`` calls per step returned)."""

    def make(module: nn.Module) -> Step:
        from lightning_ema import EMA

        ema = EMA(module, decay, **kwargs)
        next_step = counter()
        n = ema.config.every_n_steps

        def step() -> None:
            for _ in range(n):
                ema.update(next_step())

        return step

    return make


def update_cases(peers: dict[str, Peer]) -> list[Case]:
    all_floats = "params + float buffers"
    return [
        Case(DEFAULT, all_floats, lightning_ema_case()),
        Case(IGNORE, all_floats, lightning_ema_case(nonfinite="ignore")),
        *peer_cases(peers),
    ]


def run_cases(
    module: nn.Module, cases: list[Case], peers: dict[str, Peer], reps: int, budget_s: float
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every available case on ``module`` plus the flat reference ("flat"); return samples and reasons."""
    steps: dict[str, Step] = {"flat": flat_reference(averaged_numel(module))}
    per_call: dict[str, int] = {}
    missing: dict[str, str] = {}
    for case in cases:
        peer = peers.get(case.peer) if case.peer else None
        if peer is not None and peer.error:
            missing[case.name] = f"unavailable ({peer.package}: {peer.error})"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step = case.make(module)
                for _ in range(3):  # the first calls of some peers copy instead of averaging
                    step()
        except Exception as error:
            missing[case.name] = unavailable(error)
            continue
        steps[case.name] = step
        per_call[case.name] = case.calls_per_step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = timed_round_robin(steps, reps, per_call, budget_s)
    del steps
    gc.collect()
    return samples, missing


def run_update_tables(peers: dict[str, Peer], config: Config, report: Report) -> None:
    cases = update_cases(peers)
    for kind, label, title in (
        ("many", "1a", "ResNet-50 layout: 320 state tensors (161 parameters + BN buffers)"),
        ("few", "1b", "a few large tensors: 4 weight matrices"),
    ):
        log(f"update: {kind} ...")
        module = build_model(kind, config.quick)
        numel = averaged_numel(module)
        n_state, n_params = count_tensors(module)
        samples, missing = run_cases(module, cases, peers, config.reps, config.budget_s[kind])
        flat = median_ms(samples["flat"])
        report.emit()
        report.emit(f"## {label}. Update time per optimizer step: {title}")
        report.emit()
        report.emit(
            f"{numel / 1e6:.2f}M averaged float32 elements in {n_state} state tensors ({n_params} parameters). "
            f"Bandwidth limit (one flat `lerp_` over {numel / 1e6:.2f}M contiguous elements, "
            f"{12 * numel / 2**20:.0f} MiB moved): **{fmt_ms(flat)} ms** "
            f"(= {12 * numel / (flat / 1e3) / 1e9:.1f} GB/s). Medians of {len(samples['flat'])} round-robin "
            "repetitions."
        )
        report.emit()
        rows = []
        for case in cases:
            if case.name in missing:
                rows.append([case.name, case.averages, "-", "-", missing[case.name]])
                continue
            ms = median_ms(samples[case.name])
            rows.append(
                [case.name, case.averages, fmt_ms(ms), fmt_ms(min(samples[case.name]) * 1e3), fmt_ratio(ms / flat)]
            )
        report.emit(table(["method", "averages", "median ms", "min ms", "x bandwidth limit"], rows))
        report.results[kind] = {name: median_ms(values) / flat for name, values in samples.items() if name != "flat"}
        del module, samples
        gc.collect()


# ---------------------------------------------------------------------------------------------- 1c
def _blocked_check_and_lerp(numel: int, block: int) -> Step:
    """One pass: screen a block, then lerp it while it is in cache. It cannot refuse an update exactly."""
    ema, weight = torch.randn(numel), torch.randn(numel)
    pairs = list(zip(ema.split(block), weight.split(block), strict=True))
    slot = torch.empty(())

    def step() -> None:
        for e, w in pairs:
            torch.sum(w, 0, out=slot)
            e.lerp_(w, ALPHA)

    return step


def _two_passes(numel: int) -> Step:
    """The least an exact check costs: one read of every weight, then the lerp."""
    ema, weight = torch.randn(numel), torch.randn(numel)
    slot = torch.empty(())

    def step() -> None:
        torch.sum(weight, 0, out=slot)
        ema.lerp_(weight, ALPHA)

    return step


def run_diagnosis(config: Config, report: Report) -> None:
    """Where the update's time goes, piece by piece, and what a one-pass or a two-pass check costs at best."""
    from lightning_ema import EMA

    log("diagnosis ...")
    module = build_model("many", config.quick)
    numel = averaged_numel(module)
    model_ema = EMA(module, DECAY)
    storage = model_ema._storage  # the engine's own pieces, timed one by one
    ignore = EMA(module, DECAY, nonfinite="ignore")
    schedule = model_ema.schedule
    live = [t for t in module.state_dict().values() if t.is_floating_point()]
    steps, steps_ignore = counter(), counter()
    flat_name = "flat `lerp_` (bandwidth limit)"
    candidates: dict[str, Step] = {
        flat_name: flat_reference(numel),
        "full `update(step)`, nonfinite='error' (default)": lambda: model_ema.update(steps()),
        "full `update(step)`, nonfinite='ignore'": lambda: ignore.update(steps_ignore()),
        "the check: `Storage.nonfinite()` (sums into preallocated slots; small tensors in one buffer)": lambda: (
            storage.nonfinite()
        ),
        "the lerp: `Storage.average` (multi-tensor lerp; integer buffers copied)": lambda: storage.average([ALPHA]),
        "schedule: `interval_decay` + `schedule(step)`": lambda: (schedule.interval_decay(5, 5), schedule(5)),
        "floor of an exact check, flat: one `sum` pass, then one `lerp_` pass": _two_passes(numel),
        "one pass, flat: `sum` then `lerp_` per 4 MiB block (cannot refuse exactly)": _blocked_check_and_lerp(
            numel, 2**20
        ),
        "other check: `_foreach_norm(ord=inf)` (one read, exact; the device path's)": lambda: torch._foreach_norm(
            live, float("inf")
        ),
        "other check: `_foreach_max` (one read; NaN and +inf only)": lambda: torch._foreach_max(live),
        "other check: per-tensor `aminmax` (one read, exact)": lambda: [torch.aminmax(t) for t in live],
    }
    pieces: dict[str, Step] = {}
    failed: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            fn()
            pieces[name] = fn
        except Exception as error:  # the engine's internals may move; say so instead of failing the run
            failed[name] = unavailable(error)
    samples = timed_round_robin(pieces, config.reps, budget_s=config.budget_s["diagnosis"])
    base = median_ms(samples[flat_name])
    rows = []
    for name in candidates:
        if name in failed:
            rows.append([name, "-", failed[name]])
        else:
            ms = median_ms(samples[name])
            rows.append([name, fmt_ms(ms), fmt_ratio(ms / base)])
            report.results.setdefault("diagnosis", {})[name] = ms / base
    report.emit()
    report.emit("## 1c. Where lightning-ema's update time goes (ResNet-50 layout)")
    report.emit()
    report.emit(
        f"Each piece timed alone, round-robin ({len(samples[flat_name])} repetitions), over the same tensors as "
        "table 1a; ratios to this table's own flat `lerp_`. The pieces are the engine's own (`Storage` of an "
        "`EMA` bound to the model). The 'flat' rows are not lightning-ema code: over one contiguous tensor of the "
        "model's size they show the least an exact check can cost (every weight read once before any EMA "
        "element is written: a refused update must leave the EMA bit for bit as it was), and what a check fused "
        "into the update block by block costs (one pass over memory, but a NaN found in block k comes after "
        "blocks 0..k-1 were written, so such an update cannot be refused exactly). The 'other' rows time other "
        "one-read reductions over the same weights."
    )
    report.emit()
    report.emit(table(["piece", "median ms", "x bandwidth limit"], rows))


# ---------------------------------------------------------------------------------------------- 4
KDECAYS = (0.99, 0.999, 0.9999)
KDECAYS_ONE = "decay=[0.99, 0.999, 0.9999]: three EMAs in one callback (default check)"
KDECAYS_MANY = "three separate callbacks' updates, decays 0.99, 0.999, 0.9999 (default check)"


def _in_turn(steps: list[Step]) -> Step:
    def step() -> None:
        for each in steps:
            each()

    return step


def run_variants(peers: dict[str, Peer], config: Config, report: Report) -> None:
    log("variants ...")
    module = build_model("many", config.quick)
    numel = averaged_numel(module)
    bf16 = copy.deepcopy(module).to(torch.bfloat16)
    flat_name = "flat f32 `lerp_`"
    steps: dict[str, Step] = {flat_name: flat_reference(numel)}
    per_call: dict[str, int] = {}
    # name: (module, EMA arguments, least bytes per element and optimizer step such an update moves)
    variants: dict[str, tuple[nn.Module, dict[str, Any], float]] = {
        "default (EMA with the weights)": (module, {}, 12),
        "device='cpu' (offload; on this CPU-only machine the same placement and path as the default)": (
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
            failed[name] = unavailable(error)
            continue
        steps[name] = step
        per_call[name] = kwargs.get("every_n_steps", 1)
    timm = peers["timm"]
    timm_name = "peer: timm `ModelEmaV3(dtype=torch.float32)`, bf16 weights"
    least_bytes = {name: spec[2] for name, spec in variants.items()}
    least_bytes[timm_name] = 10
    if not timm.error:
        ema = timm.module.ModelEmaV3(bf16, decay=DECAY, dtype=torch.float32)
        next_step = counter()
        steps[timm_name] = lambda: ema.update(bf16, step=next_step())
        steps[timm_name]()
    samples = timed_round_robin(steps, config.reps, per_call, config.budget_s["variants"])
    flat = median_ms(samples[flat_name])
    rows = []
    for name in least_bytes:
        if name not in samples:
            rows.append([name, "-", "-", "-", "-", failed.get(name, f"unavailable ({timm.error})")])
            continue
        ms = median_ms(samples[name])
        limit = flat * least_bytes[name] / 12
        report.results.setdefault("variants", {})[name] = ms / limit
        rows.append(
            [name, fmt_ms(ms), f"{least_bytes[name]:g}", fmt_ms(limit), fmt_ratio(ms / limit), fmt_ratio(ms / flat)]
        )
    report.emit()
    report.emit("## 4. lightning-ema variants (ResNet-50 layout)")
    report.emit()
    report.emit(
        f"Flat f32 `lerp_` over {numel / 1e6:.2f}M elements (12 bytes/element): {fmt_ms(flat)} ms, medians of "
        f"{len(samples[flat_name])} round-robin repetitions. Each variant's bandwidth limit is that time scaled "
        "to the least bytes per element and optimizer step it must move: 10 for a float32 EMA of bf16 weights "
        "(read 4 + 2, write 4), 3 for an update every 4th step, 20 for two EMAs sharing one read of the weights, "
        "28 for three. The last two rows compare k decays in one callback with k callbacks (the same three EMAs)."
    )
    report.emit()
    report.emit(
        table(["variant", "median ms / step", "bytes/elem", "limit ms", "x its limit", "x f32 flat lerp"], rows)
    )
