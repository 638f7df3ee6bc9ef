"""The tensors an EMA starts from (``EMACallback(init_from=...)``): read from any checkpoint, matched by name.

:func:`initial_ema` reads the source: a checkpoint in any layout :func:`lightning_ema.load_ema_state_dict` reads,
or a plain state dict. :func:`match_names` then pairs its tensors with the names the EMA tracks, allowing for
wrapper components and a leading module path that differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_ema._files import LoadedCheckpoint
from lightning_ema._foreign import detect_format
from lightning_ema.checkpoint import ema_states, load_checkpoint, load_ema_state_dict
from lightning_ema.errors import EMAStateError
from lightning_ema.functional import canonical_name

__all__ = ["initial_ema", "match_names"]


def initial_ema(
    source: str | os.PathLike[str] | Mapping[str, Any], module: nn.Module, *, weights_only: bool = True
) -> dict[str, Tensor]:
    """Return the EMA tensors an EMA of ``module`` should start from (``EMACallback(init_from=...)``).

    ``source`` is a checkpoint file or a loaded checkpoint in any layout :func:`lightning_ema.load_ema_state_dict`
    reads (``module`` names the positional ones), or a plain ``{name: tensor}`` state dict (file or mapping).
    """
    checkpoint = source if isinstance(source, Mapping) else load_checkpoint(source, weights_only=weights_only)
    path = None if isinstance(source, Mapping) else source
    recognised = ema_states(checkpoint) or detect_format(checkpoint, path) is not None
    if not recognised and checkpoint and all(isinstance(value, Tensor) for value in checkpoint.values()):
        return dict(checkpoint)  # a plain state dict
    if not isinstance(source, Mapping):
        checkpoint = LoadedCheckpoint(checkpoint, source)
    return load_ema_state_dict(checkpoint, module=module, weights_only=weights_only)


def match_names(source: Mapping[str, Tensor], wanted: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Tensor]:
    """Return ``source``'s tensors under the ``wanted`` names (``optional`` ones may be absent).

    Names are compared without wrapper components (``module.``, ``_orig_mod.``); if they differ by a leading
    module path (a LightningModule's ``model.`` against a bare model's names, either way round), the one prefix
    that pairs every wanted name is used.

    Raises:
        EMAStateError: listing the wanted names (not optional) that ``source`` lacks.
    """
    by_name = {canonical_name(name): tensor for name, tensor in source.items()}
    required = [name for name in wanted if name not in set(optional)]

    def lookup(drop: str, add: str) -> dict[str, Tensor]:
        found = {}
        for name in wanted:
            key = canonical_name(name)
            if key.startswith(drop):
                tensor = by_name.get(add + key[len(drop) :])
                if tensor is not None:
                    found[name] = tensor
        return found

    candidates = [("", "")]
    if required:
        first = canonical_name(required[0])
        for key in by_name:
            if first.endswith("." + key):
                candidates.append((first[: -len(key)], ""))
            elif key.endswith("." + first):
                candidates.append(("", key[: -len(first)]))
    results = [lookup(drop, add) for drop, add in candidates]
    complete = [found for found in results if all(name in found for name in required)]
    if complete:
        return max(complete, key=len)
    missing = sorted(name for name in required if name not in results[0])
    raise EMAStateError(
        f"The EMA to start from lacks {missing[:8]}{' ...' if len(missing) > 8 else ''} "
        f"({len(missing)} of the {len(required)} tensors needed); it holds {sorted(source)[:5]!r}. Pass a state dict "
        "renamed to the module's names if they differ by more than a leading module path."
    )
