"""Command line: ``python -m lightning_ema export CKPT OUT`` writes a checkpoint's EMA weights to a file.

``python -m lightning_ema posthoc DIR --sigma-rel 0.07 OUT`` synthesises a post-hoc EMA from PostHocEMA snapshots.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from lightning_ema.checkpoint import FORMAT, checked_states, decays_of, emas_of, export_ema, load_checkpoint
from lightning_ema.formats import FOREIGN_FORMATS, detect_format
from lightning_ema.posthoc import DEFAULT_MAX_ERROR, save_state_dict, synthesis_plan, synthesize_many


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_ema", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="write the EMA weights of a Lightning checkpoint as a plain state dict",
        description="Write the EMA weights of a Lightning checkpoint as a plain state dict that "
        "`torch.load(OUT, weights_only=True)` reads and `model.load_state_dict` accepts "
        "(safetensors when OUT ends in .safetensors).",
    )
    export.add_argument(
        "checkpoint",
        help="checkpoint written with EMACallback, or another library's EMA checkpoint (see --format)",
    )
    export.add_argument("output", help="file to write (.safetensors or anything else for torch.save)")
    export.add_argument("--state-key", help="which EMA, when the checkpoint holds several (see `list`)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, help="which EMA of a callback with several decays, by position")
    which.add_argument("--decay", type=float, help="which EMA of a callback with several decays, by value")
    export.add_argument("--prefix", help="keep only names starting with PREFIX, and strip it (e.g. 'model.')")
    export.add_argument(
        "--format",
        choices=[FORMAT, *FOREIGN_FORMATS],
        help="the checkpoint's layout (default: recognised); diffusers and torch-ema need the model, "
        "so only Python's load_ema_state_dict(path, module=model) reads them",
    )
    export.add_argument(
        "--to",
        choices=["state_dict", "timm", "diffusers"],
        default="state_dict",
        help="the layout to write: a plain state dict (default), timm's checkpoint (state_dict_ema) or diffusers' "
        "EMAModel.state_dict() (shadow_params of the tensors not named like buffers, in order)",
    )
    export.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load the checkpoint with weights_only=False (only for files you trust)",
    )
    listing = commands.add_parser("list", help="list the EMA states a checkpoint holds")
    listing.add_argument("checkpoint")
    listing.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load the checkpoint with weights_only=False (only for files you trust)",
    )
    _add_posthoc_parser(commands)
    return parser


def _add_posthoc_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    posthoc = commands.add_parser(
        "posthoc",
        help="synthesise the EMA of any sigma_rel from PostHocEMA snapshots",
        description="Synthesise post-hoc EMAs (Karras et al. 2024) from the snapshots a PostHocEMA run wrote in DIR, "
        "and write each as a plain state dict (safetensors when OUT ends in .safetensors). With several "
        "--sigma-rel values, one file each: OUT with '-sigma<value>' before its suffix "
        "(ema.pt -> ema-sigma0.05.pt, ema-sigma0.1.pt).",
    )
    posthoc.add_argument("dirpath", metavar="DIR", nargs="?", help="the snapshot folder of a PostHocEMA run")
    posthoc.add_argument(
        "--sigma-rel",
        nargs="+",
        required=True,
        metavar="SIGMA_REL",
        help="relative width(s) of the EMA to synthesise, e.g. 0.07 or 0.03 0.05 0.1",
    )
    posthoc.add_argument("output", metavar="OUT", nargs="?", help="file to write (.safetensors or .pt)")
    posthoc.add_argument("--step", type=int, help="the snapshot step to synthesise at (default: the last)")
    posthoc.add_argument(
        "--max-error",
        type=float,
        default=DEFAULT_MAX_ERROR,
        help=f"refuse a width whose relative profile error exceeds this (default {DEFAULT_MAX_ERROR}; "
        "a negative value accepts any)",
    )


def _posthoc_outputs(output: str, sigma_rels: list[float], given: list[str]) -> list[Path]:
    if len(sigma_rels) == 1:
        return [Path(output)]
    path = Path(output)
    return [path.with_name(f"{path.stem}-sigma{text}{path.suffix}") for text in given]


def _posthoc(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    """Run ``posthoc``: one synthesised state dict per ``--sigma-rel``; errors as one line and exit code 2."""
    # `--sigma-rel` takes one or more values, so argparse hands it the positionals that follow it too.
    given = list(args.sigma_rel)
    trailing: list[str] = []
    while given and not _is_number(given[-1]):
        trailing.insert(0, given.pop())
    found = [value for value in (args.dirpath, args.output) if value is not None] + trailing + extra
    positionals = _in_order(found, argv)
    try:
        unknown = [value for value in extra if value.startswith("-")]
        if unknown:
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
        if len(positionals) != 2 or not given:
            raise ValueError(
                "usage: python -m lightning_ema posthoc DIR --sigma-rel SIGMA_REL [SIGMA_REL ...] OUT, got "
                f"{len(positionals)} paths {positionals!r} and widths {given!r}"
            )
        dirpath, output = positionals
        sigma_rels = [float(text) for text in given]
        if len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"`--sigma-rel` must list distinct values, got {given!r}")
        outputs = _posthoc_outputs(output, sigma_rels, given)
        max_error = None if args.max_error < 0 else args.max_error
        weights = synthesize_many(dirpath, sigma_rels, step=args.step, max_error=max_error)
        for (sigma, state), path in zip(weights.items(), outputs, strict=True):
            plan = synthesis_plan(dirpath, sigma, step=args.step)
            save_state_dict(state, path)
            print(
                f"wrote {path}: sigma_rel {sigma} at step {plan.step} from {len(plan.snapshots)} snapshots, "
                f"relative profile error {plan.error:.2e}"
            )
    except (OSError, ValueError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    except Exception as error:  # a file can fail in ways nobody listed; say so in one line, never a traceback
        print(f"error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _in_order(values: list[str], argv: list[str]) -> list[str]:
    """``values`` sorted by where they appear on the command line (each occurrence claimed once)."""
    claimed: set[int] = set()
    positions = []
    for value in values:
        index = next((i for i, arg in enumerate(argv) if arg == value and i not in claimed), len(argv))
        claimed.add(index)
        positions.append(index)
    return [value for _, value in sorted(zip(positions, values, strict=True), key=lambda pair: pair[0])]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _foreign_hint(checkpoint: dict[str, object]) -> str:
    """For ``list``: the other library's EMA a checkpoint without lightning-ema state holds, if it is recognised."""
    layout = detect_format(checkpoint)
    if layout is None:
        return ""
    reader = "load_ema_state_dict(path, module=model)" if layout in ("diffusers", "torch-ema") else "`export`"
    return f" of lightning-ema's, but a {layout} EMA, which {reader} reads"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code (2 for any failure, with one ``error:`` line on stderr)."""
    with warnings.catch_warnings():
        # torch warns before it fails to read a plain pickle (not a torch.save file); the error line says it all
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "posthoc":
        # its positionals may follow options: argparse leaves those over, or hands them to --sigma-rel
        return _posthoc(args, extra, list(sys.argv[1:] if argv is None else argv))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "list":
            checkpoint = load_checkpoint(args.checkpoint, weights_only=not args.unsafe_load)
            states = checked_states(checkpoint)
            for key, state in states.items():
                for index, (decay, ema) in enumerate(zip(decays_of(state), emas_of(state), strict=True)):
                    print(f"{key}\tindex={index}\t{decay}\tnum_updates={state['num_updates']}\ttensors={len(ema)}")
            if not states:
                print(f"no EMA state in this checkpoint{_foreign_hint(checkpoint)}", file=sys.stderr)
                return 1
            return 0
        weights = export_ema(
            args.checkpoint,
            args.output,
            state_key=args.state_key,
            index=args.index,
            decay=args.decay,
            prefix=args.prefix,
            weights_only=not args.unsafe_load,
            format=args.format,
            to=args.to,
        )
    except (OSError, ValueError) as error:  # EMAStateError is a ValueError
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # a file can fail in ways nobody listed; say so in one line, never a traceback
        print(f"error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {len(weights)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
