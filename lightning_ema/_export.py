"""Writing exported EMA weights: a plain state dict (safetensors or ``torch.save``), or timm's or diffusers' layout.

:func:`to_timm` and :func:`to_diffusers` build those two layouts in memory (public in :mod:`lightning_ema.formats`);
:func:`write_export` writes any of the three. Every file is written under a temporary name next to its destination
and renamed into place once complete (:func:`~lightning_ema._files.write_atomically`), so a failed write leaves the
destination as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ema._files import write_atomically

__all__ = ["looks_like_buffer", "to_diffusers", "to_timm", "write_export"]


def looks_like_buffer(name: str, tensor: Tensor) -> bool:
    """Whether a tensor of a saved state dict is a buffer by its name alone (BatchNorm statistics, integers)."""
    return not tensor.is_floating_point() or name.rsplit(".", 1)[-1] in ("running_mean", "running_var")


def to_timm(weights: Mapping[str, Tensor]) -> dict[str, Any]:
    """Return timm's checkpoint layout for an exported EMA: the EMA under ``state_dict_ema`` and ``state_dict``.

    ``timm.models.load_checkpoint(model, path, use_ema=True)`` reads ``state_dict_ema``; the same tensors under
    ``state_dict`` make ``use_ema=False`` (and ``timm.create_model(..., checkpoint_path=path)``) load the EMA too,
    which is what an export for inference is for.
    """
    return {"state_dict": dict(weights), "state_dict_ema": dict(weights)}


def to_diffusers(
    weights: Mapping[str, Tensor],
    *,
    step: int | None = None,
    parameter_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Return diffusers' ``EMAModel.state_dict()`` layout: ``shadow_params`` in parameter order.

    Args:
        weights: the EMA by name, in the model's ``state_dict`` order.
        step: saved as ``optimization_step`` if given; the other settings (``decay``, warm-up) are left out, so
            that ``EMAModel.load_state_dict`` keeps the ones the ``EMAModel`` was created with.
        parameter_names: the model's parameter names in ``named_parameters()`` order; ``None`` takes every
            tensor of ``weights`` that :func:`looks_like_buffer` does not flag, in order, tied duplicates once.

    Raises:
        ValueError: if a parameter name is not in ``weights``.
    """
    if parameter_names is None:
        seen: set[tuple[int, int]] = set()
        names = []
        for name, tensor in weights.items():
            identity = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
            if looks_like_buffer(name, tensor) or identity in seen:
                continue
            seen.add(identity)
            names.append(name)
    else:
        names = list(parameter_names)
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"`parameter_names` must name tensors of the EMA; not in it: {missing[:5]}.")
    state: dict[str, Any] = {"shadow_params": [weights[name] for name in names]}
    if step is not None:
        state["optimization_step"] = int(step)
    return state


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
