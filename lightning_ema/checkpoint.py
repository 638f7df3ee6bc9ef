"""Where the EMA lives in a Lightning checkpoint, and how to get it out for inference.

Layout: ``checkpoint["callbacks"][state_key]`` of each :class:`~lightning_ema.EMACallback` holds::

    {"format": "lightning-ema", "version": 2,
     "config": {"decays": [repr of each schedule], ...plain values describing the callback...},
     "num_updates": int, "last_update_step": int,
     "emas": [{state_dict name: tensor}, ...]}      # one dict per decay, in the order given

Version 1 (single decay) had ``"config": {"decay": repr, ...}`` and ``"ema": {name: tensor}``; it is still read.

``checkpoint["state_dict"]`` keeps the raw weights. Everything is tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it.

Sharded (FSDP2) runs: each rank holds the EMA of its shards only. ``"emas"`` then lacks the sharded names, which
``"sharded"`` lists, and their EMA is stored where Lightning puts every rank's shards:

- a distributed checkpoint (a folder, ``ModelParallelStrategy``'s default) routes only ``checkpoint["state_dict"]``
  through ``torch.distributed.checkpoint``, so the EMA shards are DTensors under
  ``state_dict["__ema__/<state_key>/<index>/<name>"]`` there (the rest of the callback state goes to ``meta.pt``);
- a single-file checkpoint gets the full EMA tensors in ``"emas"``, gathered from every rank when saving.

:func:`load_checkpoint` reads both; for a folder it loads only the ``state_dict`` tensors, in one process, and
moves the EMA shards back into the callback states, so that everything below works the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FORMAT",
    "SHARD_PREFIX",
    "VERSION",
    "config_changes",
    "decays_of",
    "ema_states",
    "emas_of",
    "export_ema",
    "load_checkpoint",
    "load_ema_state_dict",
    "shard_key",
]

FORMAT = "lightning-ema"
VERSION = 2
SHARD_PREFIX = "__ema__/"
_METADATA_FILE = "meta.pt"  # what ModelParallelStrategy names the non-tensor part of a distributed checkpoint


def shard_key(state_key: str, index: int, name: str) -> str:
    """The ``checkpoint["state_dict"]`` key under which a sharded EMA tensor is saved in a distributed checkpoint."""
    return f"{SHARD_PREFIX}{state_key}/{index}/{name}"


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
    if path.is_dir():
        return _load_distributed_checkpoint(path, weights_only=weights_only)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    from lightning_ema.formats import allowed_globals

    try:
        with allowed_globals():  # argparse.Namespace: timm's training checkpoints hold their `args` as one
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


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Describe the settings that differ between a saved configuration and the current one (``None``: same)."""
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in current.items() if saved.get(key) != value]
    return ", ".join(changed) or None


def _load_distributed_checkpoint(path: Path, *, weights_only: bool) -> dict[str, Any]:
    """Read a distributed checkpoint folder in one process: ``meta.pt`` plus the ``state_dict`` tensors."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    if not (path / _METADATA_FILE).is_file():
        raise FileNotFoundError(f"{str(path)!r} is a folder without {_METADATA_FILE}: not a distributed checkpoint.")
    checkpoint = dict(torch.load(path / _METADATA_FILE, map_location="cpu", weights_only=weights_only))
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    wanted = {
        key.removeprefix("state_dict."): torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata)
    }
    request = {"state_dict": wanted}
    load(request, checkpoint_id=str(path), no_dist=True)
    weights = request["state_dict"]
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if isinstance(state, Mapping) and state.get("format") == FORMAT and state.get("sharded"):
            state = dict(state)
            state["emas"] = [
                {**ema, **{name: weights.pop(shard_key(key, index, name)) for name in state["sharded"]}}
                for index, ema in enumerate(state["emas"])
            ]
            checkpoint["callbacks"][key] = state
    checkpoint["state_dict"] = {key: value for key, value in weights.items() if not key.startswith(SHARD_PREFIX)}
    return checkpoint


def load_sharded_ema(path: str | os.PathLike[str], state_key: str, state: dict[str, Any], module: nn.Module) -> None:
    """Fill ``state["emas"]`` with this rank's EMA shards from a distributed checkpoint folder (all ranks call it).

    Raises:
        EMAStateError: if the folder lacks a shard the state lists; nothing is changed then.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    from lightning_ema.errors import EMAStateError
    from lightning_ema.sharding import reshard_all

    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    reshard_all(module)
    live = module.state_dict(keep_vars=True)
    keys = {
        (index, name): shard_key(state_key, index, name)
        for index in range(len(state["emas"]))
        for name in state["sharded"]
    }
    missing = sorted(key for (_, name), key in keys.items() if f"state_dict.{key}" not in stored or name not in live)
    if missing:
        raise EMAStateError(
            f"The distributed checkpoint {str(path)!r} lacks EMA shards or the model their names: {missing}."
        )
    placeholders = {
        key: torch.empty_like(live[name], dtype=stored[f"state_dict.{key}"].properties.dtype)  # type: ignore[union-attr]
        for (_, name), key in keys.items()
    }
    load({"state_dict": placeholders}, checkpoint_id=str(path))
    for (index, name), key in keys.items():
        state["emas"][index][name] = placeholders[key].to_local().clone()  # type: ignore[attr-defined]


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


class _Loaded(dict[str, Any]):
    """A checkpoint already loaded from ``path`` (NeMo's layout needs the path to find its second file)."""

    def __init__(self, checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
        super().__init__(checkpoint)
        self.path = path


def load_ema_state_dict(
    path_or_checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    state_key: str | None = None,
    index: int | None = None,
    decay: Any = None,
    prefix: str | None = None,
    weights_only: bool = True,
    format: str | None = None,
    module: nn.Module | None = None,
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
        format: the layout: ``None`` recognises it, ``"lightning-ema"`` (this package's) or one of
            :data:`lightning_ema.formats.FOREIGN_FORMATS` forces one. Other libraries' layouts (Lightning
            ``EMAWeightAveraging``, NeMo, timm, mmengine/mmdet/mmyolo/mmagic, mmcv, ema-pytorch, diffusers,
            torch-ema) are read by :mod:`lightning_ema.formats`; ``state_key``, ``index`` and ``decay`` are
            this package's only.
        module: the model a positional layout (diffusers ``EMAModel``, torch-ema) was made from: its
            ``named_parameters()`` name the saved list by position.

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
    path = path_or_checkpoint.path if isinstance(path_or_checkpoint, _Loaded) else None
    if not isinstance(path_or_checkpoint, Mapping):
        path = path_or_checkpoint
    weights = _ema_weights(checkpoint, path, state_key, index, decay, format, module, weights_only)
    if prefix is not None:
        weights = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        if not weights:
            raise ValueError(f"`prefix` must start some state_dict names, got {prefix!r}.")
    return weights


def _ema_weights(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike[str] | None,
    state_key: str | None,
    index: int | None,
    decay: Any,
    format: str | None,
    module: nn.Module | None,
    weights_only: bool,
) -> dict[str, Tensor]:
    """The EMA weights of a loaded checkpoint: this package's layout, or another library's (:mod:`.formats`)."""
    states = ema_states(checkpoint)
    if format not in (None, FORMAT) or (format is None and not states):
        from lightning_ema.formats import read_foreign

        if state_key is not None or index is not None or decay is not None:
            raise ValueError(
                "`state_key`, `index` and `decay` choose among lightning-ema's EMA states; this checkpoint holds "
                f"another library's EMA (format={format!r}). Leave them unset."
            )
        return read_foreign(checkpoint, format=format, path=path, module=module, weights_only=weights_only).weights
    weights: dict[str, Tensor] = dict(checkpoint.get("state_dict") or {})
    weights.update(_select_ema(_select_state(states, state_key), index, decay))
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
    format: str | None = None,
    module: nn.Module | None = None,
    to: str = "state_dict",
) -> dict[str, Tensor]:
    """Write a checkpoint's EMA weights as a plain state dict (``.safetensors`` by suffix, else ``torch.save``).

    ``format`` and ``module`` are those of :func:`load_ema_state_dict`. ``to="timm"`` writes timm's checkpoint
    layout (the EMA under ``state_dict_ema`` and ``state_dict``), ``to="diffusers"`` the ``EMAModel.state_dict()``
    layout (``shadow_params`` in parameter order: ``module``'s parameters if given, else every tensor not named
    like a buffer, see :func:`lightning_ema.formats.to_diffusers`); both with ``torch.save``.

    Returns:
        The state dict of EMA weights that was written (before any timm/diffusers wrapping).
    """
    from lightning_ema._validate import check_choice

    to = check_choice("to", to, ("state_dict", "timm", "diffusers"))
    checkpoint = load_checkpoint(checkpoint_path, weights_only=weights_only)
    weights = load_ema_state_dict(
        _Loaded(checkpoint, checkpoint_path),
        state_key=state_key,
        index=index,
        decay=decay,
        prefix=prefix,
        weights_only=weights_only,
        format=format,
        module=module,
    )
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    if to != "state_dict":
        from lightning_ema.formats import to_diffusers, to_timm

        if output.suffix == ".safetensors":
            raise ValueError(f"`to={to!r}` writes a torch.save file; choose an output name not ending in .safetensors.")
        if to == "timm":
            torch.save(to_timm(weights), output)
        else:
            saved_step = checkpoint.get("global_step")
            step = saved_step if isinstance(saved_step, int) else None
            names = None if module is None else [name for name, _ in module.named_parameters()]
            torch.save(to_diffusers(weights, step=step, parameter_names=names), output)
        return weights
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
