"""Benchmark lightning-ema's EMA update, swap and training overhead against its peers and the bandwidth limit.

Run from the repository root: ``python -m bench`` (full, 3-5 minutes on 2 cores) or ``python -m bench --quick``
(small models, under a minute, for smoke testing). The GPU tables run only where CUDA is available. See
bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from .common import DECAY, Report, cpu_name, fmt_bytes, fmt_ms, fmt_ratio, log, make_config, table, wait_for_idle
from .fit import run_e2e
from .peers import load_peers
from .swap import run_swap
from .update import DEFAULT, IGNORE, run_diagnosis, run_update_tables, run_variants

SECTIONS = ("update", "diagnosis", "swap", "fit", "variants", "gpu")

#: The previous release's figures for ``nonfinite="ignore"`` (README, same machine), which it must not exceed.
IGNORE_BEFORE = {"many": 1.14, "few": 1.01}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small configuration for smoke testing (< 60 s)")
    parser.add_argument(
        "--out",
        default=None,
        help="write the markdown tables here (default bench/results.md; with --quick bench/results-quick.md, "
        "so that a smoke test does not overwrite the full run's results)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to fall below 0.5 (other work finished)",
    )
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.only.split(",") if name.strip()]
    wrong = sorted(set(sections) - set(SECTIONS))
    if wrong:
        parser.error(f"--only must name sections of {SECTIONS}, got {wrong}")
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
    report = Report()
    log("loading peers ...")
    peers = load_peers()
    import lightning

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import lightning_ema

    gpu = torch.cuda.is_available()
    report.emit(f"# lightning-ema benchmark{' (--quick)' if config.quick else ''}")
    report.emit()
    report.emit(
        f"torch {torch.__version__}, lightning {lightning.__version__}, lightning-ema {lightning_ema.__version__}, "
        f"Python {platform.python_version()}; CPU: {cpu_name()}, {os.cpu_count()} cores; "
        f"torch threads = {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}); "
        f"GPU: {torch.cuda.get_device_name() if gpu else 'none (the GPU tables are not run)'}; "
        f"decay {DECAY}; each figure is a median over up to {config.reps} repetitions (the count per table is "
        "given with it)."
    )
    report.emit()
    report.emit("Peers:")
    report.emit()
    report.emit(
        table(
            ["package", "version", "status"],
            [[p.package, p.version, "ok" if not p.error else f"unavailable ({p.error})"] for p in peers.values()],
        )
    )
    if "update" in sections:
        run_update_tables(peers, config, report)
    if "diagnosis" in sections:
        run_diagnosis(config, report)
    if "swap" in sections:
        run_swap(peers, config, report)
    if "fit" in sections:
        run_e2e(peers, config, report)
    if "variants" in sections:
        run_variants(peers, config, report)
    if "gpu" in sections and gpu:
        from .gpu import run_gpu_steps, run_gpu_update

        device = torch.device("cuda")
        run_gpu_update(peers, config, report, device)
        run_gpu_steps(config, report, device)

    report.emit()
    report.emit("## Targets")
    report.emit()
    report.emit(table(["target", "measured", "met?"], targets(report.results)))
    elapsed = time.perf_counter() - started
    report.emit()
    report.emit(
        f"Total benchmark time {elapsed:.0f} s. 1-minute load average {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (above ~{args.threads} means other processes competed for the "
        "cores and the absolute times are noisy; the ratios are taken within one run and suffer less)."
    )
    if args.out:
        report.write(args.out)
    return 0


def targets(results: dict[str, object]) -> list[list[str]]:
    """The performance issue's targets, each with this run's figure and whether it was met."""
    rows = []
    for kind, limit, label in (("many", 1.25, "320-tensor"), ("few", 1.10, "large-tensor")):
        ratios = results.get(kind, {})
        assert isinstance(ratios, dict)
        if DEFAULT in ratios:
            ratio = ratios[DEFAULT]
            rows.append(
                [
                    f"update <= {limit}x bandwidth limit, {label} model (default)",
                    fmt_ratio(ratio),
                    _verdict(ratio, limit),
                ]
            )
        if IGNORE in ratios:
            ratio, before = ratios[IGNORE], IGNORE_BEFORE[kind]
            rows.append(
                [
                    f"update with nonfinite='ignore' no slower than before ({before:.2f}x), {label} model",
                    fmt_ratio(ratio),
                    _verdict(ratio, before),
                ]
            )
    swap = results.get("swap", {})
    assert isinstance(swap, dict)
    if "lightning-ema `swap_in` + `swap_out`" in swap:
        ms, peak = swap["lightning-ema `swap_in` + `swap_out`"]
        rows.append(["swap: no extra memory", fmt_bytes(peak), "met" if peak == 0 else "MISSED"])
        rows.append(["swap < 2 ms (320 tensors)", f"{fmt_ms(ms)} ms", _verdict(ms, 2.0)])
    e2e = results.get("e2e", {})
    assert isinstance(e2e, dict)
    for (optimizer, ema), (ratio, hook_ratio, _) in e2e.items():
        measured = f"{fmt_ratio(ratio)} (hook alone {fmt_ratio(hook_ratio)})"
        if ema == "flat lerp":
            rows.append([f"(calibration: the ideal flat `lerp_` in the same hook, {optimizer})", measured, "-"])
        elif ema.startswith("lightning-ema"):
            rows.append([f"fit overhead <= 1.3x bandwidth limit ({optimizer}, {ema})", measured, _verdict(ratio, 1.3)])
    return rows


def _verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"MISSED by {100 * (value / limit - 1):.0f}%"


if __name__ == "__main__":
    sys.exit(main())
