"""Post-hoc EMA costs: storage and write time of one snapshot, time of one synthesis.

    python bench/posthoc.py            # ResNet-50 layout (25.6M parameters), 16 snapshots: ~3.3 GB on disk, ~1 min
    python bench/posthoc.py --quick    # a smoke test: base width 16 (1.6M parameters), 8 snapshots

A snapshot holds the two tracked EMAs (PostHocEMA's default sigma_rels=(0.05, 0.10)) of every averaged tensor. The
write is what a training step pays when a snapshot is due (CPU tensors here: on a GPU add the copy to the host).
The synthesis reads every snapshot once and accumulates in float64; the files are in the OS page cache right after
being written (a cold read adds file size / disk bandwidth). Times are medians of ``--repeat`` runs. Standalone:
imports only torch and lightning_ema.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_ema.posthoc import (
    list_snapshots,
    snapshot_filename,
    synthesis_plan,
    synthesize,
    synthesize_many,
    write_snapshot,
)
from lightning_ema.schedules import KarrasDecay

SIGMAS = (0.05, 0.10)


def resnet50_state(base: int = 64) -> dict[str, torch.Tensor]:
    """The state_dict shapes of a ResNet-50 (bottleneck blocks 3-4-6-3, batch norm, a 1000-way head), random values."""
    generator = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(prefix: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{name}"] = (cout,)
        shapes[f"{prefix}.bn.num_batches_tracked"] = ()

    conv_bn("stem", 3, base, 7)
    inplanes = base
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = base * 2**stage
        for block in range(blocks):
            prefix = f"layer{stage + 1}.{block}"
            conv_bn(f"{prefix}.a", inplanes, width, 1)
            conv_bn(f"{prefix}.b", width, width, 3)
            conv_bn(f"{prefix}.c", width, width * 4, 1)
            if block == 0:
                conv_bn(f"{prefix}.downsample", inplanes, width * 4, 1)
            inplanes = width * 4
    shapes["fc.weight"], shapes["fc.bias"] = (1000, inplanes), (1000,)
    return {
        name: torch.tensor(0) if not shape else torch.randn(shape, generator=generator)
        for name, shape in shapes.items()
    }


def median_time(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--snapshots", type=int, default=None, help="snapshots in the folder (default 16, quick 8)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the snapshots (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    count = args.snapshots or (8 if args.quick else 16)
    state = resnet50_state(base=16 if args.quick else 64)
    parameters = sum(t.numel() for n, t in state.items() if "running" not in n and t.is_floating_point())
    gammas = [KarrasDecay(sigma_rel=s).gamma for s in SIGMAS]
    emas = [{n: t + 0.01 * k for n, t in state.items()} for k in range(len(SIGMAS))]
    print(
        f"# Post-hoc EMA: {parameters / 1e6:.1f}M parameters in {len(state)} state_dict tensors, {args.threads} threads"
    )

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        folder = Path(scratch)
        print("\n| snapshot (2 EMAs) | file size | write time |")
        print("| --- | --- | --- |")
        for file_format in ("safetensors", "torch"):
            for dtype in (torch.float32, torch.float16):
                path = folder / "one" / snapshot_filename(1, file_format=file_format)

                def write(path: Path = path, dtype: torch.dtype = dtype) -> None:
                    converted = [{n: t.to(dtype) if t.is_floating_point() else t for n, t in e.items()} for e in emas]
                    write_snapshot(path, step=1, sigma_rels=SIGMAS, gammas=gammas, emas=converted)

                seconds = median_time(write, args.repeat)
                size = path.stat().st_size
                name = f"{file_format}, {str(dtype).removeprefix('torch.')}"
                per_parameter = size / parameters
                print(f"| {name} | {size / 2**20:.1f} MiB ({per_parameter:.2f} B/parameter) | {seconds * 1e3:.0f} ms |")

        run = folder / "run"
        steps = [1000 * (i + 1) for i in range(count)]
        for i, step in enumerate(steps):
            drifted = [{n: t + 0.001 * i if t.is_floating_point() else t for n, t in e.items()} for e in emas]
            path = run / snapshot_filename(step, file_format="safetensors")
            write_snapshot(path, step=step, sigma_rels=SIGMAS, gammas=gammas, emas=drifted)
        total = sum(p.stat().st_size for p in run.iterdir())
        from lightning_ema import _snapshots

        def list_uncached() -> None:
            _snapshots._HEADERS.clear()  # time the first listing, not the header cache
            list_snapshots(run)

        listing = median_time(list_uncached, args.repeat)
        plan = median_time(lambda: synthesis_plan(run, 0.07), args.repeat)  # headers cached: the solve
        one = median_time(lambda: synthesize(run, 0.07), args.repeat)
        five = median_time(lambda: synthesize_many(run, [0.03, 0.05, 0.07, 0.1, 0.15], max_error=None), args.repeat)
        print(
            f"\n| synthesis from {count} snapshots ({total / 2**30:.2f} GiB, float32 safetensors, warm cache) | time |"
        )
        print("| --- | --- |")
        print(f"| list the snapshots (headers only) | {listing * 1e3:.1f} ms |")
        print(
            f"| coefficients: float64 least squares over {2 * count} profiles (headers cached) | {plan * 1e3:.1f} ms |"
        )
        print(f"| one sigma_rel (`synthesize`) | {one:.2f} s ({total / one / 2**30:.2f} GiB/s read and accumulated) |")
        print(f"| five sigma_rels in one pass (`synthesize_many`) | {five:.2f} s |")


if __name__ == "__main__":
    main()
