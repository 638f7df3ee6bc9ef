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
moves the EMA shards back into the callback states, so that everything below works the same. Nothing in a folder is
unpickled beyond what ``weights_only`` allows: ``meta.pt`` goes through ``torch.load(weights_only=...)`` and the
folder's ``.metadata`` through an unpickler that knows only torch's metadata classes (:mod:`lightning_ema._dcp`).

Every EMA state a reader returns has passed :func:`~lightning_ema._state_validation.check_ema_state`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightning_ema._checkpoint_folders import SHARD_PREFIX, load_distributed_checkpoint, load_sharded_ema, shard_key
from lightning_ema._export import write_export
from lightning_ema._files import LoadedCheckpoint, allowed_globals, load_file, refuse_same_file
from lightning_ema._foreign import read_foreign
from lightning_ema._state_keys import config_changes, find_state_key, normalize_state_key
from lightning_ema._state_validation import FORMAT, VERSION, check_ema_state, check_tensors
from lightning_ema._validate import check_choice
from lightning_ema.errors import EMAStateError
from lightning_ema.schedules import as_schedule, normalize_repr

__all__ = [
    "FORMAT",
    "SHARD_PREFIX",
    "VERSION",
    "checked_states",
    "config_changes",
    "decays_of",
    "ema_states",
    "emas_of",
    "export_ema",
    "find_state_key",
    "load_checkpoint",
    "load_ema_state_dict",
    "load_sharded_ema",
    "normalize_state_key",
    "shard_key",
]


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
    """Load a checkpoint file, or a distributed checkpoint folder, onto the CPU.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: saying what the file is when it is not a readable checkpoint: empty, truncated or damaged, a
            safetensors file, not a checkpoint at all, a folder without a distributed checkpoint's files, or a file
            holding an object that ``weights_only=True`` refuses for safety (only then is ``weights_only=False``
            suggested).
    """
    path = Path(path)
    if path.is_dir():
        return load_distributed_checkpoint(path, weights_only=weights_only)
    with allowed_globals():  # argparse.Namespace: timm's training checkpoints hold their `args` as one
        checkpoint = load_file(path, weights_only=weights_only)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint: it holds a {type(checkpoint).__name__}, not a dict."
        )
    return checkpoint


def ema_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the states of every :class:`~lightning_ema.EMACallback` in ``checkpoint`` by state key (unchecked).

    Raises:
        EMAStateError: if ``checkpoint["callbacks"]`` is not a dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise EMAStateError(f"A checkpoint must be a dict, got a {type(checkpoint).__name__}.")
    callbacks = checkpoint.get("callbacks") or {}
    if not isinstance(callbacks, Mapping):
        raise EMAStateError(
            f"checkpoint['callbacks'] must be a dict of callback states by key, got a {type(callbacks).__name__}."
        )
    return {
        str(key): dict(state)
        for key, state in callbacks.items()
        if isinstance(state, Mapping) and state.get("format") == FORMAT
    }


def _select_state(states: dict[str, dict[str, Any]], state_key: str | None) -> str:
    if not states:
        raise ValueError(
            "The checkpoint holds no EMA state: it was not written by a Trainer with an EMACallback, "
            "or it was saved with weights_only=True."
        )
    if state_key is not None:
        found = find_state_key(states, state_key) if isinstance(state_key, str) else None
        if found is None:
            raise ValueError(f"`state_key` must be one of {sorted(states)!r}, got {state_key!r}.")
        return found
    if len(states) > 1:
        raise ValueError(
            f"The checkpoint holds {len(states)} EMA states; choose one with `state_key`, one of {sorted(states)!r}."
        )
    return next(iter(states))


def checked_states(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return every EMA state of ``checkpoint`` by key, each checked against the checkpoint's raw weights.

    Raises:
        EMAStateError: naming the state, the EMA and the tensors, for the first state that is malformed.
    """
    raw = _raw_weights(checkpoint)
    return {key: check_ema_state(state, state_key=key, weights=raw) for key, state in ema_states(checkpoint).items()}


def _raw_weights(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    raw = checkpoint.get("state_dict")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise EMAStateError(f"checkpoint['state_dict'] must be a dict of tensors by name, got a {type(raw).__name__}.")
    tensors = {name: value for name, value in raw.items() if isinstance(value, Tensor)}
    check_tensors(tensors, where="The checkpoint's raw weights (checkpoint['state_dict'])", finite=False)
    return dict(raw)


def _select_ema(state: Mapping[str, Any], index: int | None, decay: Any) -> Mapping[str, Tensor]:
    emas, decays = emas_of(state), decays_of(state)
    if index is not None and decay is not None:
        raise ValueError(f"Pass `index` or `decay`, not both; got index={index!r} and decay={decay!r}.")
    if decay is not None:
        wanted = repr(as_schedule(decay))
        normalized = [normalize_repr(saved) for saved in decays]
        if wanted not in normalized:
            raise ValueError(f"`decay` must be one of the saved decays {decays}, got {decay!r}.")
        return emas[normalized.index(wanted)]
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
        ValueError: if the file is not a readable checkpoint (the message says what it is), if the checkpoint holds
            no EMA state, several without a ``state_key``, several EMAs without an ``index`` or ``decay``, or nothing
            under ``prefix``.
        EMAStateError: if the EMA state is malformed: a missing or unknown layout version, missing entries,
            tensors that are not plain dense tensors, NaN or infinity, or an EMA whose shape or dtype does not fit
            its raw weight. The message names the state, the EMA and the tensors.

    Example::

        model = Net()
        model.load_state_dict(load_ema_state_dict("last.ckpt", prefix="net."))
    """
    if isinstance(path_or_checkpoint, Mapping):
        checkpoint: Mapping[str, Any] = path_or_checkpoint
    else:
        checkpoint = load_checkpoint(path_or_checkpoint, weights_only=weights_only)
    path = path_or_checkpoint.path if isinstance(path_or_checkpoint, LoadedCheckpoint) else None
    if not isinstance(path_or_checkpoint, Mapping):
        path = path_or_checkpoint
    weights = _without_compile_wrappers(
        _ema_weights(checkpoint, path, state_key, index, decay, format, module, weights_only)
    )
    if prefix is not None:
        weights = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        if not weights:
            raise ValueError(f"`prefix` must start some state_dict names, got {prefix!r}.")
    return weights


def _without_compile_wrappers(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``_orig_mod.`` / ``_forward_module.`` components ``torch.compile`` and Fabric put into names.

    ``net._orig_mod.fc.weight`` becomes ``net.fc.weight``, what the uncompiled module's ``load_state_dict`` expects.
    (A leading ``module.`` is kept: in a LightningModule's names it is the user's own attribute.)
    """
    result: dict[str, Tensor] = {}
    for name, tensor in weights.items():
        plain = ".".join(part for part in name.split(".") if part not in ("_orig_mod", "_forward_module"))
        if plain in result:
            return weights  # both forms are present: the names are the module's own, leave them
        result[plain] = tensor
    return result


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
        if state_key is not None or index is not None or decay is not None:
            raise ValueError(
                "`state_key`, `index` and `decay` choose among lightning-ema's EMA states; this checkpoint holds "
                f"another library's EMA (format={format!r}). Leave them unset."
            )
        foreign = read_foreign(checkpoint, format=format, path=path, module=module, weights_only=weights_only)
        # issue 13: another library's EMA, normalised to {name: tensor}, is held to the same rules as ours
        where = f"The {foreign.format} EMA" + (f" of {str(path)!r}" if path is not None else "")
        return check_tensors(foreign.weights, where=where)
    key = _select_state(states, state_key)
    raw = _raw_weights(checkpoint)
    state = check_ema_state(states[key], state_key=key, weights=raw)
    weights: dict[str, Tensor] = dict(raw)
    weights.update(_select_ema(state, index, decay))
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

    The file is written next to ``output_path`` under a temporary name and renamed into place once complete, so a
    failed write (a full disk) leaves whatever was at ``output_path`` as it was.

    Returns:
        The state dict of EMA weights that was written (before any timm/diffusers wrapping).

    Raises:
        ValueError: if ``output_path`` is the checkpoint itself (the same path, a symbolic or hard link to it, or a
            file inside a checkpoint folder), a folder, or anything :func:`load_ema_state_dict` raises for.
        OSError: if writing fails; ``output_path`` is left as it was.
    """
    to = check_choice("to", to, ("state_dict", "timm", "diffusers"))
    source, output = Path(checkpoint_path), Path(output_path)
    refuse_same_file(source, output)
    checkpoint = load_checkpoint(source, weights_only=weights_only)
    weights = load_ema_state_dict(
        LoadedCheckpoint(checkpoint, checkpoint_path),
        state_key=state_key,
        index=index,
        decay=decay,
        prefix=prefix,
        weights_only=weights_only,
        format=format,
        module=module,
    )
    saved_step = checkpoint.get("global_step")
    write_export(
        output,
        weights,
        to=to,
        step=saved_step if isinstance(saved_step, int) else None,
        parameter_names=None if module is None else [name for name, _ in module.named_parameters()],
    )
    return weights
