"""Writing exported EMA weights: a plain state dict (safetensors or ``torch.save``), or timm's or diffusers' layout.

Every file is written under a temporary name next to its destination and renamed into place once complete
(:func:`~lightning_ema._files.write_atomically`), so a failed write leaves the destination as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_ema._files import write_atomically

__all__ = ["write_export"]


def write_export(
    output: Path,
    weights: Mapping[str, Tensor],
    *,
    to: str,
    step: int | None,
    parameter_names: Sequence[str] | None,
) -> None:
    """Write ``weights`` to ``output`` in the layout ``to`` names (see :func:`lightning_ema.checkpoint.export_ema`).

    Args:
        output: the file to write; a ``.safetensors`` suffix chooses safetensors for ``to="state_dict"``.
        weights: the EMA state dict.
        to: ``"state_dict"``, ``"timm"`` or ``"diffusers"``.
        step: the optimizer step the checkpoint was saved at, for diffusers' ``optimization_step``.
        parameter_names: the parameters' names in order, for diffusers' ``shadow_params``.

    Raises:
        ValueError: if the layout cannot be written to a file of that suffix, or safetensors is not installed.
        OSError: if writing fails; ``output`` is left as it was.
    """
    if to != "state_dict":
        from lightning_ema.formats import to_diffusers, to_timm

        if output.suffix == ".safetensors":
            raise ValueError(f"`to={to!r}` writes a torch.save file; choose an output name not ending in .safetensors.")
        if to == "timm":
            wrapped = to_timm(weights)
        else:
            wrapped = to_diffusers(weights, step=step, parameter_names=parameter_names)
        _save_atomically(output, wrapped)
    elif output.suffix == ".safetensors":
        _write_safetensors(output, weights)
    else:
        _save_atomically(output, weights)


def _write_safetensors(output: Path, weights: Mapping[str, Tensor]) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as error:
        raise ValueError(f"Writing {str(output)!r} needs the safetensors package: pip install safetensors.") from error
    not_tensors = sorted(name for name, value in weights.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise ValueError(
            f"A safetensors file holds tensors only, but these entries are not: {not_tensors}. Export to a "
            "file with another suffix (torch.save) instead."
        )
    # safetensors refuses tensors that share storage (tied weights): give each its own.
    seen: set[int] = set()
    contiguous = {}
    for name, tensor in weights.items():
        pointer = tensor.untyped_storage().data_ptr()
        contiguous[name] = tensor.contiguous() if pointer not in seen else tensor.clone()
        seen.add(pointer)
    write_atomically(output, lambda path: save_file(contiguous, path))


def _save_atomically(output: Path, obj: object) -> None:
    def save(path: str) -> None:
        with open(path, "wb") as stream:  # through Python's file, so a full disk raises OSError with its errno
            torch.save(obj, stream)

    write_atomically(output, save)
