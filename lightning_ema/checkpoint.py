"""Where the EMA lives in a Lightning checkpoint, and how to get it out for inference.

Layout: ``checkpoint["callbacks"][state_key]`` of each :class:`~lightning_ema.EMACallback` holds::

    {"format": "lightning-ema", "version": 2,
     "config": {"decays": [repr of each schedule], ...plain values describing the callback...},
     "num_updates": int, "last_update_step": int,
     "emas": [{state_dict name: tensor}, ...]}      # one dict per decay, in the order given

Version 1 (single decay) had ``"config": {"decay": repr, ...}`` and ``"ema": {name: tensor}``; it is still read.

``checkpoint["state_dict"]`` keeps the raw weights. Everything is tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "VERSION",
    "decays_of",
    "ema_states",
    "emas_of",
    "export_ema",
    "load_checkpoint",
    "load_ema_state_dict",
]

FORMAT = "lightning-ema"
VERSION = 2


def emas_of(state: Mapping[str, Any]) -> list[Mapping[str, Tensor]]:
    """Return the EMA tensors of a saved callback state, one mapping per decay (any layout version)."""
    if "emas" in state:
        return list(state["emas"])
    return [state["ema"]]


def decays_of(state: Mapping[str, Any]) -> list[str]:
    """Return the schedule descriptions (``repr``) of a saved callback state, one per EMA."""
    config = state.get("config") or {}
    if "decays" in config:
        return [str(decay) for decay in config["decays"]]
    return [str(config.get("decay"))]


def load_checkpoint(path: str | os.PathLike[str], *, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file holds objects that ``weights_only=True`` refuses (with the way out).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        if not weights_only:
            raise
        raise ValueError(
            f"`torch.load({str(path)!r}, weights_only=True)` refused the checkpoint: {error}. "
            "If you trust the file, pass weights_only=False."
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"A checkpoint must be a dict, got {type(checkpoint).__name__} from {str(path)!r}.")
    return checkpoint


def ema_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the states of every :class:`~lightning_ema.EMACallback` in ``checkpoint`` by state key."""
    callbacks = checkpoint.get("callbacks") or {}
    return {
        str(key): dict(state)
        for key, state in callbacks.items()
        if isinstance(state, Mapping) and state.get("format") == FORMAT
    }


def _select_state(states: dict[str, dict[str, Any]], state_key: str | None) -> dict[str, Any]:
    if not states:
        raise ValueError(
            "The checkpoint holds no EMA state: it was not written by a Trainer with an EMACallback, "
            "or it was saved with weights_only=True."
        )
    if state_key is not None:
        if state_key not in states:
            raise ValueError(f"`state_key` must be one of {sorted(states)!r}, got {state_key!r}.")
        return states[state_key]
    if len(states) > 1:
        raise ValueError(
            f"The checkpoint holds {len(states)} EMA states; choose one with `state_key`, one of {sorted(states)!r}."
        )
    return next(iter(states.values()))


def _select_ema(state: Mapping[str, Any], index: int | None, decay: Any) -> Mapping[str, Tensor]:
    emas, decays = emas_of(state), decays_of(state)
    if index is not None and decay is not None:
        raise ValueError(f"Pass `index` or `decay`, not both; got index={index!r} and decay={decay!r}.")
    if decay is not None:
        from lightning_ema.schedules import DecaySchedule, as_schedule

        wanted = repr(decay if isinstance(decay, DecaySchedule) else as_schedule(decay))
        if wanted not in decays:
            raise ValueError(f"`decay` must be one of the saved decays {decays}, got {decay!r}.")
        return emas[decays.index(wanted)]
    if index is None:
        if len(emas) > 1:
            raise ValueError(f"The EMA state holds {len(emas)} EMAs ({decays}); choose one with `index` or `decay`.")
        index = 0
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(emas):
        raise ValueError(f"`index` must be an integer in [0, {len(emas)}) for the EMAs {decays}, got {index!r}.")
    return emas[index]


def load_ema_state_dict(
    path_or_checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    state_key: str | None = None,
    index: int | None = None,
    decay: Any = None,
    prefix: str | None = None,
    weights_only: bool = True,
) -> dict[str, Tensor]:
    """Return a checkpoint's EMA weights, ready for ``model.load_state_dict``.

    Tensors the EMA does not track (excluded by ``include``/``exclude`` or ``buffers="ignore"``) are taken
    from the checkpoint's raw ``state_dict``, so the result is a complete state dict of the LightningModule.

    Args:
        path_or_checkpoint: a checkpoint file, or a checkpoint already loaded as a dict.
        state_key: which callback's EMA to return when several ``EMACallback`` states are saved.
        index: which EMA of a callback with several decays, by position in its ``decay`` list.
        decay: which EMA of a callback with several decays, by value (``0.9999``) or schedule object.
        prefix: keep only names that start with it, with the prefix removed (``"model."`` gives the
            state dict of ``LightningModule.model``).
        weights_only: passed to ``torch.load``; leave it ``True`` unless you trust the file.

    Raises:
        ValueError: if the checkpoint holds no EMA state, several without a ``state_key``, several EMAs
            without an ``index`` or ``decay``, or nothing under ``prefix``.

    Example::

        model = Net()
        model.load_state_dict(load_ema_state_dict("last.ckpt", prefix="net."))
    """
    if isinstance(path_or_checkpoint, Mapping):
        checkpoint: Mapping[str, Any] = path_or_checkpoint
    else:
        checkpoint = load_checkpoint(path_or_checkpoint, weights_only=weights_only)
    state = _select_state(ema_states(checkpoint), state_key)
    weights: dict[str, Tensor] = dict(checkpoint.get("state_dict") or {})
    weights.update(_select_ema(state, index, decay))
    if prefix is not None:
        weights = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        if not weights:
            raise ValueError(f"`prefix` must start some state_dict names, got {prefix!r}.")
    return weights


def export_ema(
    checkpoint_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    state_key: str | None = None,
    index: int | None = None,
    decay: Any = None,
    prefix: str | None = None,
    weights_only: bool = True,
) -> dict[str, Tensor]:
    """Write a checkpoint's EMA weights as a plain state dict (``.safetensors`` by suffix, else ``torch.save``).

    Returns:
        The state dict that was written.
    """
    weights = load_ema_state_dict(
        checkpoint_path, state_key=state_key, index=index, decay=decay, prefix=prefix, weights_only=weights_only
    )
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as error:
            raise ValueError(
                f"Writing {str(output)!r} needs the safetensors package: pip install safetensors."
            ) from error
        # safetensors refuses tensors that share storage (tied weights): give each its own.
        seen: set[int] = set()
        contiguous = {}
        for name, tensor in weights.items():
            pointer = tensor.untyped_storage().data_ptr()
            contiguous[name] = tensor.contiguous() if pointer not in seen else tensor.clone()
            seen.add(pointer)
        save_file(contiguous, str(output))
    else:
        torch.save(weights, output)
    return weights
