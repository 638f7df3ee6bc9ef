"""Command line: ``python -m lightning_ema export CKPT OUT`` writes a checkpoint's EMA weights to a file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_ema.checkpoint import FORMAT, checked_states, decays_of, emas_of, export_ema, load_checkpoint
from lightning_ema.formats import FOREIGN_FORMATS


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
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code (2 for any failure, with one ``error:`` line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            states = checked_states(load_checkpoint(args.checkpoint, weights_only=not args.unsafe_load))
            for key, state in states.items():
                for index, (decay, ema) in enumerate(zip(decays_of(state), emas_of(state), strict=True)):
                    print(f"{key}\tindex={index}\t{decay}\tnum_updates={state['num_updates']}\ttensors={len(ema)}")
            if not states:
                print("no EMA state in this checkpoint", file=sys.stderr)
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
