"""Recognising and reading other libraries' EMA checkpoint layouts (torch only).

The layouts, by the name passed as ``format=``, and how each is recognised are listed in
:mod:`lightning_ema.formats`, the public module. :func:`detect_format` tells them apart by their keys,
:func:`read_foreign` takes the EMA out of a loaded checkpoint as ``{state_dict name: tensor}``, and
:func:`load_foreign` does both for a file. Files are read with :func:`~lightning_ema._files.load_file`, whose
errors say what a file is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema._files import allowed_globals, load_file

__all__ = ["FOREIGN_FORMATS", "ForeignEMA", "detect_format", "load_foreign", "read_foreign"]

FOREIGN_FORMATS = (
    "lightning",
    "nemo",
    "timm",
    "mmengine",
    "mean-teacher",
    "mmagic",
    "mmcv",
    "ema-pytorch",
    "diffusers",
    "torch-ema",
)
_POSITIONAL = ("diffusers", "torch-ema")
_NEMO_SUFFIX = "-EMA"


@dataclass(frozen=True)
class ForeignEMA:
    """An EMA read from another library's layout: the layout's name, the tensors by name, the step if saved."""

    format: str
    weights: dict[str, Tensor]
    step: int | None = None


def _load_file(path: Path, weights_only: bool) -> dict[str, Any]:
    with allowed_globals():
        loaded = load_file(path, weights_only=weights_only)
    if not isinstance(loaded, dict):
        raise ValueError(f"A checkpoint must be a dict, got {type(loaded).__name__} from {str(path)!r}.")
    return loaded


def _nemo_sibling(path: Path | None) -> Path | None:
    """The ``X-EMA.ckpt`` that NeMo writes beside ``X.ckpt`` (or ``path`` itself if it is one), if it exists."""
    if path is None or not path.is_file():
        return None
    if path.stem.endswith(_NEMO_SUFFIX):
        return path
    sibling = path.with_name(f"{path.stem}{_NEMO_SUFFIX}{path.suffix}")
    return sibling if sibling.is_file() else None


def _tensors(mapping: Any) -> dict[str, Tensor] | None:
    if not isinstance(mapping, Mapping) or not mapping:
        return None
    if not all(isinstance(key, str) for key in mapping):
        return None
    return {key: value for key, value in mapping.items() if isinstance(value, Tensor)}


def _nemo_ema_optimizer(checkpoint: Mapping[str, Any]) -> bool:
    states = checkpoint.get("optimizer_states")
    return isinstance(states, list) and any(isinstance(s, Mapping) and "ema" in s and "opt" in s for s in states)


def _nemo_state_dict_is_ema(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds the EMA that the optimizer states' ``"ema"`` lists hold (NeMo's ``X-EMA.ckpt``).

    NeMo's ``EMAOptimizer`` saves the EMA as positional lists in the optimizer states. In the ``X-EMA.ckpt`` its
    ``ModelCheckpoint`` writes, the EMA is swapped into the model, so those lists are the ``state_dict``'s own
    parameters; in a checkpoint saved any other way (``trainer.save_checkpoint``, Lightning's ``ModelCheckpoint``)
    ``state_dict`` holds the raw weights and the lists the EMA.
    """
    state = _tensors(checkpoint.get("state_dict")) or {}
    by_shape: dict[tuple[Any, ...], list[Tensor]] = {}
    for tensor in state.values():
        by_shape.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)
    for optimizer in checkpoint.get("optimizer_states") or []:
        averages = optimizer.get("ema") if isinstance(optimizer, Mapping) else None
        for average in averages if isinstance(averages, (list, tuple)) else []:
            if not isinstance(average, Tensor):
                return False
            same = by_shape.get((tuple(average.shape), average.dtype), [])
            if not any(torch.equal(average, tensor) for tensor in same):
                return False
    return True


def _mmcv_pairs(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{parameter name: its ema_* buffer name}`` for mmcv's ``EMAHook`` layout."""
    return {
        name: f"ema_{name.replace('.', '_')}"
        for name in state
        if not name.startswith("ema_") and f"ema_{name.replace('.', '_')}" in state
    }


def _mmagic_pairs(state: Mapping[str, Tensor]) -> dict[str, str]:
    """``{source name: EMA name}`` for mmagic's ``X_ema`` modules whose source ``X`` is saved too.

    ``X_ema`` is a copy of ``X`` (``X_ema.<name>``) or mmengine's averaged model around one
    (``X_ema.module.<name>``, next to ``X_ema.steps``).
    """
    pairs = {}
    for key in state:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not part.endswith("_ema") or part == "_ema":
                continue
            base, rest = [*parts[:i], part[: -len("_ema")]], parts[i + 1 :]
            for tail in (rest, rest[1:] if rest[0] == "module" and len(rest) > 1 else None):
                source = ".".join(base + tail) if tail else None
                if source is not None and source in state:
                    pairs[source] = key
                    break
            break
    return pairs


def _mmagic_prefixes(pairs: Mapping[str, str]) -> set[str]:
    """The ``...X_ema.`` prefixes of the EMA modules found by :func:`_mmagic_pairs`."""
    prefixes = set()
    for key in pairs.values():
        parts = key.split(".")
        i = next(i for i, part in enumerate(parts) if part.endswith("_ema"))
        prefixes.add(".".join(parts[: i + 1]) + ".")
    return prefixes


def detect_format(checkpoint: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> str | None:
    """Return the name of the foreign EMA layout of ``checkpoint`` (see :mod:`lightning_ema.formats`), or ``None``."""
    keys = set(checkpoint)
    if {"current_model_state", "averaging_state"} <= keys:
        return "lightning"
    if "state_dict_ema" in keys or "model_ema" in keys:
        return "timm"
    if "ema_state_dict" in keys and "state_dict" in keys:
        return "mmengine"
    # After the layouts told by their keys: NeMo's is told by a file name (`X-EMA.ckpt`), which any file may have.
    named_nemo = path is not None and "state_dict" in keys and _nemo_sibling(Path(path)) is not None
    if named_nemo or _nemo_ema_optimizer(checkpoint):
        return "nemo"
    if "shadow_params" in keys:
        return "torch-ema" if "num_updates" in keys else "diffusers"
    if "initted" in keys and any(str(key).startswith("ema_model.") for key in keys):
        return "ema-pytorch"
    state = _tensors(checkpoint.get("state_dict", checkpoint))
    if not state:
        return None
    if any(k.startswith("teacher.") for k in state) and any(k.startswith("student.") for k in state):
        return "mean-teacher"
    if _mmagic_pairs(state):
        return "mmagic"
    if _mmcv_pairs(state):
        return "mmcv"
    return None


def _step_of(checkpoint: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = checkpoint.get(key)
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {(name[len("module.") :] if name.startswith("module.") else name): t for name, t in state.items()}


def _state_dict(checkpoint: Mapping[str, Any], key: str, layout: str) -> dict[str, Tensor]:
    state = _tensors(checkpoint.get(key))
    if not state:
        raise ValueError(f"A {layout} checkpoint must hold a mapping of tensors under {key!r}; found none.")
    return state


def _positional(checkpoint: Mapping[str, Any], layout: str, module: nn.Module | None) -> dict[str, Tensor]:
    shadow = checkpoint.get("shadow_params")
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, Tensor) for t in shadow):
        raise ValueError(f"A {layout} state must hold `shadow_params`, a list of tensors; got {type(shadow).__name__}.")
    if module is None:
        raise ValueError(
            f"A {layout} state keeps its averages as a list in the order of the model's parameters, without names: "
            "it can only be read with the module it was made from, whose parameters name them by position. Pass "
            "`module=` (the model whose `.parameters()` the EMA was created with); the command line cannot read it."
        )
    names = [name for name, _ in module.named_parameters()]
    if len(names) != len(shadow):
        raise ValueError(
            f"The {layout} state holds {len(shadow)} averages but `module` has {len(names)} parameters; it was made "
            "from another model (or another selection of its parameters)."
        )
    wrong = [
        f"{name}: saved {tuple(t.shape)} vs module {tuple(p.shape)}"
        for (name, p), t in zip(module.named_parameters(), shadow, strict=True)
        if t.shape != p.shape
    ]
    if wrong:
        raise ValueError(f"The {layout} state does not fit `module` paired by position: {wrong[:5]}.")
    return dict(zip(names, shadow, strict=True))


def read_foreign(
    checkpoint: Mapping[str, Any],
    *,
    format: str | None = None,
    path: str | os.PathLike[str] | None = None,
    module: nn.Module | None = None,
    weights_only: bool = True,
) -> ForeignEMA:
    """Return the EMA of a checkpoint in another library's layout.

    Args:
        checkpoint: the loaded file.
        format: the layout (one of :data:`FOREIGN_FORMATS`); ``None`` recognises it.
        path: the file ``checkpoint`` came from (NeMo keeps its EMA in a second file beside it).
        module: the model a positional layout (``diffusers``, ``torch-ema``) was made from.
        weights_only: passed to ``torch.load`` for NeMo's second file.

    Raises:
        ValueError: if the layout is not recognised or does not hold what it should (naming what is missing).
    """
    if format is None:
        format = detect_format(checkpoint, path)
        if format is None:
            raise ValueError(
                f"The checkpoint holds no EMA in a layout lightning-ema reads (lightning-ema, "
                f"{', '.join(FOREIGN_FORMATS)}); its top-level keys are {sorted(map(str, checkpoint))[:12]!r}."
            )
    elif format not in FOREIGN_FORMATS:
        raise ValueError(f"`format` must be None, 'lightning-ema' or one of {list(FOREIGN_FORMATS)}, got {format!r}.")
    step = _step_of(checkpoint, "global_step")
    if format == "lightning":
        return ForeignEMA(format, _state_dict(checkpoint, "state_dict", "Lightning EMAWeightAveraging"), step)
    if format == "nemo":
        sibling = _nemo_sibling(Path(path)) if path is not None else None
        if sibling is not None and Path(path or "") != sibling:
            checkpoint = _load_file(sibling, weights_only)
            step = _step_of(checkpoint, "global_step")
        elif sibling is None and not _nemo_ema_optimizer(checkpoint):
            raise ValueError(
                f"NeMo keeps the EMA in `X{_NEMO_SUFFIX}.ckpt` beside `X.ckpt`; no such file is beside {str(path)!r}."
            )
        elif sibling is None and not _nemo_state_dict_is_ema(checkpoint):
            raise ValueError(
                "This NeMo checkpoint was not written by NeMo's ModelCheckpoint: its `state_dict` holds the raw "
                "weights, and the EMA is only in its optimizer states, as lists without names. Read the "
                f"`X{_NEMO_SUFFIX}.ckpt` NeMo's ModelCheckpoint writes beside `X.ckpt` instead."
            )
        return ForeignEMA(format, _state_dict(checkpoint, "state_dict", "NeMo EMA"), step)
    if format == "timm":
        key = "state_dict_ema" if "state_dict_ema" in checkpoint else "model_ema"
        return ForeignEMA(format, _strip_module(_state_dict(checkpoint, key, "timm")), None)
    if format == "mmengine":
        if not isinstance(checkpoint.get("ema_state_dict"), Mapping):
            raise ValueError("An mmengine EMAHook checkpoint must hold `ema_state_dict` next to `state_dict`.")
        step = _step_of(checkpoint.get("meta") or {}, "iter")
        return ForeignEMA(format, _state_dict(checkpoint, "state_dict", "mmengine EMAHook"), step)
    if format in _POSITIONAL:
        step = _step_of(checkpoint, "optimization_step" if format == "diffusers" else "num_updates")
        return ForeignEMA(format, _positional(checkpoint, format, module), step)
    if format == "ema-pytorch":
        state = _tensors(checkpoint) or {}
        weights = {name[len("ema_model.") :]: t for name, t in state.items() if name.startswith("ema_model.")}
        if not weights:
            raise ValueError("An ema-pytorch state must hold `ema_model.*` tensors; found none.")
        return ForeignEMA(format, weights, _step_of(checkpoint, "step"))
    state = _tensors(checkpoint.get("state_dict", checkpoint)) or {}
    meta_step = _step_of(checkpoint.get("meta") or {}, "iter")
    if format == "mean-teacher":
        weights = {name[len("teacher.") :]: t for name, t in state.items() if name.startswith("teacher.")}
        if not weights:
            raise ValueError("A mean-teacher checkpoint must hold `teacher.*` tensors in its state_dict; found none.")
        return ForeignEMA(format, weights, step if step is not None else meta_step)
    if format == "mmagic":
        pairs = _mmagic_pairs(state)
        if not pairs:
            raise ValueError("An mmagic checkpoint must hold `X_ema.*` tensors next to `X.*`; found none.")
        prefixes = tuple(_mmagic_prefixes(pairs))
        weights = {name: t for name, t in state.items() if not name.startswith(prefixes)}
        weights.update({source: state[ema] for source, ema in pairs.items()})
        return ForeignEMA(format, weights, meta_step)
    # mmcv
    pairs = _mmcv_pairs(state)
    if not pairs:
        raise ValueError(
            "An mmcv EMAHook checkpoint must hold `ema_<name>` buffers next to the parameters; found none."
        )
    buffers = set(pairs.values())
    weights = {name: state[pairs.get(name, name)] for name in state if name not in buffers}
    return ForeignEMA(format, weights, meta_step)


def load_foreign(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    module: nn.Module | None = None,
    weights_only: bool = True,
) -> ForeignEMA:
    """Read a file in another library's layout (see :func:`read_foreign`)."""
    return read_foreign(
        _load_file(Path(path), weights_only), format=format, path=path, module=module, weights_only=weights_only
    )
