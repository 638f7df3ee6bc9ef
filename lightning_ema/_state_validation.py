"""One validation of an EMA state, for every reader of a checkpoint and for resume (torch only).

Everything that reads EMA tensors from a file goes through here before it uses them: ``load_ema_state_dict``,
``python -m lightning_ema export`` and ``list``, ``EMACallback.load_state_dict`` and ``EMA.load_state_dict``.
Readers of other libraries' layouts normalise theirs to ``{name: tensor}`` mappings and call
:func:`check_tensors` / :func:`check_emas` on them, so that every EMA that enters lightning-ema is held to the same
rules:

- structure: mappings where mappings belong, one list of EMAs, integer counters, a known layout version;
- names: non-empty strings, the same in every EMA of a state;
- tensors: plain dense tensors with storage (not meta, sparse, quantized, nested or distributed ones), of a
  floating-point, integer or bool dtype, with the same shape and dtype in every EMA of a state;
- finiteness: no NaN or infinity in a floating-point EMA (an EMA that holds one stays NaN for ever);
- fit: where the weights are known (a checkpoint's raw ``state_dict``, the module on resume), the EMA of a weight has
  its shape, and a dtype that can hold it (:func:`dtype_fits`).

Every problem raises :class:`~lightning_ema.errors.EMAStateError` with a message that says what is wrong and where:
the state key, the EMA's position (and decay), the tensor's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema.errors import EMAStateError

__all__ = [
    "FORMAT",
    "VERSION",
    "check_ema_state",
    "check_emas",
    "check_engine_state",
    "check_tensors",
    "dtype_fits",
]

#: The ``"format"`` of every state an :class:`~lightning_ema.EMACallback` saves.
FORMAT = "lightning-ema"
#: The newest layout version this package writes and reads (1: one ``"ema"``; 2: a list ``"emas"``).
VERSION = 2

_COUNTERS = ("num_updates", "last_update_step")
_MAX_LISTED = 8


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}; and {len(items) - _MAX_LISTED} more"


def _kind(value: object) -> str:
    return type(value).__name__


def _describe(tensor: Tensor) -> str:
    return f"{tuple(tensor.shape)} {tensor.dtype}"


def dtype_fits(ema: torch.dtype, weight: torch.dtype) -> bool:
    """Whether an EMA of dtype ``ema`` can stand for a weight of dtype ``weight``.

    A floating-point weight needs a floating-point EMA (its precision may differ: a float32 EMA of bfloat16
    weights is the default), a complex weight a complex EMA, and any other weight (integer buffers such as
    ``num_batches_tracked``, which are copied, not averaged) an EMA of exactly its dtype.

    Example:
        >>> dtype_fits(torch.float32, torch.bfloat16), dtype_fits(torch.int64, torch.float32)
        (True, False)
    """
    if weight.is_floating_point:
        return ema.is_floating_point
    if weight.is_complex:
        return ema.is_complex
    return ema == weight


def _tensor_problem(tensor: Tensor, *, finite: bool) -> str | None:
    """What makes ``tensor`` unusable as an EMA tensor, or ``None``."""
    if type(tensor) not in (Tensor, nn.Parameter):
        if type(tensor).__name__ == "DTensor":
            return "is a DTensor (a distributed shard); consolidate the checkpoint first"
        return f"is a {_kind(tensor)}, not a plain tensor"
    if tensor.is_meta:
        return "is a meta tensor (it has a shape but no values)"
    if tensor.layout != torch.strided:
        return f"is a {tensor.layout} tensor, not a dense one"
    if tensor.is_quantized:
        return f"is a quantized tensor ({tensor.dtype})"
    if tensor.is_nested:
        return "is a nested tensor"
    if not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool or _is_integer(tensor)):
        return f"has dtype {tensor.dtype}, which an EMA cannot hold"
    if finite and (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel():
        finite_mask = torch.isfinite(tensor)
        if not bool(finite_mask.all()):
            bad = int(finite_mask.numel() - finite_mask.sum())
            return f"holds {bad} NaN or infinite value{'s' if bad > 1 else ''} (of {tensor.numel()})"
    return None


def _is_integer(tensor: Tensor) -> bool:
    try:
        torch.iinfo(tensor.dtype)
    except TypeError:
        return False
    return True


def check_tensors(tensors: object, *, where: str, finite: bool = True) -> dict[str, Tensor]:
    """Check one ``{name: tensor}`` mapping (an EMA, or a layout's weights) and return it as a plain dict.

    Args:
        tensors: the mapping to check.
        where: what it is, for the message, e.g. ``"EMA state 'EMACallback{...}', EMA 0"``.
        finite: also refuse NaN and infinity in floating-point tensors (one read of each tensor).

    Raises:
        EMAStateError: if ``tensors`` is not a mapping, a name is not a non-empty string, or a value is not a
            plain dense tensor of a usable dtype (with ``finite``: or holds NaN or infinity). Every offending name
            is listed.
    """
    if not isinstance(tensors, Mapping):
        raise EMAStateError(f"{where} must be a dict of tensors by name, got a {_kind(tensors)}.")
    problems = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            problems.append(f"name {name!r} is not a non-empty string")
        elif not isinstance(value, Tensor):
            problems.append(f"{name!r} is a {_kind(value)}, not a tensor")
        else:
            problem = _tensor_problem(value, finite=finite)
            if problem is not None:
                problems.append(f"{name!r} {problem}")
    if problems:
        raise EMAStateError(f"{where}: {_listing(problems)}.")
    return dict(tensors)


def check_emas(
    emas: object,
    *,
    where: str,
    labels: Sequence[str] | None = None,
    weights: Mapping[str, Any] | None = None,
    finite: bool = True,
) -> list[dict[str, Tensor]]:
    """Check the EMAs of one state (one mapping per decay) and return them as a list of plain dicts.

    Every EMA must pass :func:`check_tensors`; all of them must hold the same names, each with the same shape and
    dtype. With ``weights`` (the tensors the EMA belongs to, by name: a checkpoint's raw ``state_dict``), the EMA of
    each weight found there must have its shape and a dtype that can hold it (:func:`dtype_fits`); names the
    weights lack are left alone (they are matched later, by the module that loads them). Weights that are DTensors
    are compared by dtype only, since an EMA shard is smaller than the whole tensor.

    Args:
        emas: a list with one ``{name: tensor}`` mapping per EMA.
        where: what they belong to, for the message, e.g. ``"EMA state 'EMACallback{...}'"``.
        labels: a description of each EMA (its decay), for the message.
        weights: the weights by name, if known.
        finite: refuse NaN and infinity.

    Raises:
        EMAStateError: naming the EMA and the tensors that are wrong.
    """
    if isinstance(emas, (str, bytes, Mapping)) or not isinstance(emas, Sequence):
        raise EMAStateError(f"{where} must hold a list of EMAs (one dict of tensors per decay), got a {_kind(emas)}.")
    if not emas:
        raise EMAStateError(f"{where} holds an empty list of EMAs.")

    def name_of(index: int) -> str:
        label = f" ({labels[index]})" if labels is not None and index < len(labels) else ""
        return f"{where}, EMA {index}{label}"

    checked = [check_tensors(ema, where=name_of(index), finite=finite) for index, ema in enumerate(emas)]
    first = checked[0]
    for index, ema in enumerate(checked[1:], start=1):
        problems = [f"{name!r} is missing" for name in sorted(set(first) - set(ema))]
        problems += [f"{name!r} is not in EMA 0" for name in sorted(set(ema) - set(first))]
        problems += [
            f"{name!r} is {_describe(tensor)} but {_describe(first[name])} in EMA 0"
            for name, tensor in ema.items()
            if name in first and (tensor.shape != first[name].shape or tensor.dtype != first[name].dtype)
        ]
        if problems:
            raise EMAStateError(f"{name_of(index)} does not match EMA 0: {_listing(problems)}.")
    if weights is not None:
        problems = []
        for name, tensor in first.items():
            weight = weights.get(name)
            if not isinstance(weight, Tensor):
                continue
            if not dtype_fits(tensor.dtype, weight.dtype):
                problems.append(f"{name!r} is {tensor.dtype} but its weight is {weight.dtype}")
            elif type(weight).__name__ != "DTensor" and tensor.shape != weight.shape:
                problems.append(f"{name!r} has shape {tuple(tensor.shape)} but its weight {tuple(weight.shape)}")
        if problems:
            raise EMAStateError(f"{where} does not fit the weights it averages: {_listing(problems)}.")
    return checked


def _check_counters(state: Mapping[Any, Any], where: str) -> tuple[int, int]:
    missing = [key for key in _COUNTERS if key not in state]
    if missing:
        raise EMAStateError(f"{where} lacks {missing}; it has the keys {sorted(map(str, state))!r}.")
    values = []
    for key in _COUNTERS:
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EMAStateError(f"{where}: `{key}` must be an integer >= 0, got {value!r}.")
        values.append(value)
    return values[0], values[1]


def _emas_entry(state: Mapping[Any, Any], where: str) -> object:
    if "emas" in state:
        return state["emas"]
    if "ema" in state:
        ema = state["ema"]
        if not isinstance(ema, Mapping):
            raise EMAStateError(f"{where}: `ema` must be a dict of tensors by name, got a {_kind(ema)}.")
        return [ema]
    raise EMAStateError(f"{where} lacks its EMA tensors (`emas`); it has the keys {sorted(map(str, state))!r}.")


def check_engine_state(
    state: object, *, num_emas: int, labels: Sequence[str] | None = None, where: str = "The EMA state"
) -> dict[str, Any]:
    """Check the state of an :class:`~lightning_ema.EMA` and return it normalised.

    The state holds the counters ``num_updates`` and ``last_update_step`` (and optionally ``step``, the optimizer
    steps counted so far) and ``emas``, one ``{name: tensor}`` mapping per decay (or ``ema``, the single mapping of
    the layout before several decays existed).

    Returns:
        ``{"num_updates": int, "last_update_step": int, "step": int, "emas": [dict, ...]}``, where ``step`` is at
        least ``last_update_step``.

    Raises:
        EMAStateError: if anything is malformed (see :func:`check_emas`), or the state holds another number of EMAs
            than ``num_emas``.
    """
    if not isinstance(state, Mapping):
        raise EMAStateError(f"{where} must be a dict, got a {_kind(state)}.")
    num_updates, last_update_step = _check_counters(state, where)
    step = state.get("step", last_update_step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise EMAStateError(f"{where}: `step` must be an integer >= 0, got {step!r}.")
    emas = _emas_entry(state, where)
    if isinstance(emas, Sequence) and not isinstance(emas, (str, bytes)) and len(emas) != num_emas:
        configured = f" ({list(labels)})" if labels is not None else ""
        raise EMAStateError(
            f"{where} holds {len(emas)} EMAs but {num_emas} decays are configured{configured}; nothing was loaded."
        )
    return {
        "num_updates": num_updates,
        "last_update_step": last_update_step,
        "step": max(step, last_update_step),
        "emas": check_emas(emas, where=where, labels=labels),
    }


def check_ema_state(
    state: object,
    *,
    state_key: str | None = None,
    weights: Mapping[str, Any] | None = None,
    tensors: bool = True,
) -> dict[str, Any]:
    """Check a saved :class:`~lightning_ema.EMACallback` state (any layout version) and return it normalised.

    The layout (format, version, counters, configuration, the list of EMAs and the names of sharded tensors) is
    always checked; with ``tensors`` the EMA tensors are checked too (:func:`check_emas`, against ``weights`` if
    given). Resume checks the layout here and the tensors in the engine's ``load_state_dict``, so that each tensor
    is read once.

    Args:
        state: the state, as found in ``checkpoint["callbacks"][state_key]``.
        state_key: its key, for the message.
        weights: the checkpoint's raw weights by name, if known.
        tensors: check the EMA tensors as well as the layout.

    Returns:
        A copy of the state in the version 2 layout: ``format``, ``version``, ``config`` (with ``decays``, one
        ``repr`` per EMA), ``num_updates``, ``last_update_step``, ``emas`` (a list of plain dicts) and ``sharded`` if
        present; other entries (the engine's ``step``, ``shard``) are kept as they are, for the engine to check.

    Raises:
        EMAStateError: what is wrong and where.
    """
    where = "The EMA state" if state_key is None else f"The EMA state {state_key!r}"
    if not isinstance(state, Mapping):
        raise EMAStateError(f"{where} must be a dict, got a {_kind(state)}.")
    if state.get("format") != FORMAT:
        raise EMAStateError(f"{where} is not an EMACallback state: its `format` is {state.get('format')!r}.")
    if "version" not in state:
        raise EMAStateError(
            f"{where} has no `version`: EMACallback always writes one, so the state was edited or written by "
            "something else."
        )
    version = state["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EMAStateError(f"{where}: `version` must be an integer >= 1, got {version!r}.")
    if version > VERSION:
        raise EMAStateError(
            f"{where} has layout version {version}, newer than this lightning-ema reads (up to {VERSION}). "
            "Upgrade lightning-ema to load it."
        )
    num_updates, last_update_step = _check_counters(state, where)
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise EMAStateError(f"{where}: `config` must be a dict, got a {_kind(config)}.")
    config = dict(config)
    if version == 1:
        if "emas" in state:
            raise EMAStateError(f"{where} has layout version 1, which keeps one `ema`, but holds `emas`.")
        config["decays"] = [config.pop("decay", None)]
    decays = config.get("decays")
    emas = _emas_entry(state, where)
    if version >= 2 and "emas" not in state:
        raise EMAStateError(f"{where} has layout version {version}, which keeps a list `emas`, but holds `ema`.")
    if isinstance(emas, (str, bytes, Mapping)) or not isinstance(emas, Sequence):
        raise EMAStateError(f"{where}: `emas` must be a list with one dict of tensors per decay, got a {_kind(emas)}.")
    if (
        isinstance(decays, (str, bytes))
        or not isinstance(decays, Sequence)
        or not all(isinstance(decay, str) for decay in decays)
    ):
        raise EMAStateError(f"{where}: `config['decays']` must be a list of schedule descriptions, got {decays!r}.")
    if len(decays) != len(emas):
        raise EMAStateError(f"{where} holds {len(emas)} EMAs but describes {len(decays)} decays ({list(decays)}).")
    config["decays"] = list(decays)
    normalised: dict[str, Any] = {key: value for key, value in state.items() if key != "ema"}
    normalised.update(
        format=FORMAT, version=version, config=config, num_updates=num_updates, last_update_step=last_update_step
    )
    if "sharded" in state:
        sharded = state["sharded"]
        if (
            isinstance(sharded, (str, bytes))
            or not isinstance(sharded, Sequence)
            or not all(isinstance(name, str) for name in sharded)
        ):
            raise EMAStateError(f"{where}: `sharded` must be a list of tensor names, got {sharded!r}.")
        normalised["sharded"] = list(sharded)
    if tensors:
        normalised["emas"] = check_emas(emas, where=where, labels=list(decays), weights=weights)
        missing = sorted(
            {name for name in normalised.get("sharded", ()) for ema in normalised["emas"] if name not in ema}
        )
        if missing:
            raise EMAStateError(
                f"{where} lacks the EMA shards of {missing}: they live in a distributed checkpoint's folder, not in "
                "its meta.pt alone. Read the whole folder."
            )
    else:
        for index, ema in enumerate(emas):
            if not isinstance(ema, Mapping):
                raise EMAStateError(f"{where}, EMA {index} must be a dict of tensors by name, got a {_kind(ema)}.")
        normalised["emas"] = [dict(ema) for ema in emas]
    return normalised
