"""What an EMA puts into a Lightning checkpoint besides its callback state (plain torch + DTensors).

- The raw weights stay in ``checkpoint["state_dict"]``, also when the checkpoint is written while the EMA is
  swapped in (validation-end ``ModelCheckpoint``, ``trainer.save_checkpoint`` inside ``swapped``).
- Sharded (FSDP2) EMAs: a distributed checkpoint gets every rank's EMA shards as DTensors in its ``state_dict``
  (Lightning routes only that through ``torch.distributed.checkpoint``); a single-file one gets the full tensors,
  gathered from every rank, in the callback state.
"""

from __future__ import annotations

from typing import Any

from lightning_ema.checkpoint import shard_key
from lightning_ema.ema import EMA
from lightning_ema.sharding import is_sharded, to_dtensor

__all__ = ["complete_checkpoint"]


def complete_checkpoint(ema: EMA, state_key: str, checkpoint: dict[str, Any]) -> None:
    """Add sharded EMA tensors and put the raw weights into ``checkpoint["state_dict"]`` (all ranks call it)."""
    state_dict = checkpoint.get("state_dict")
    sharding = ema.sharding
    # A distributed checkpoint holds DTensors; a single-file one full tensors on rank 0 (nothing on the others).
    distributed = state_dict is not None and any(is_sharded(value) for value in state_dict.values())
    if sharding:
        own = (checkpoint.get("callbacks") or {}).get(state_key)
        for index in range(ema.num_emas):
            averages = ema.ema_state_dict(index)
            for name, layout in sharding.items():
                shards = to_dtensor(averages[name], layout)
                if distributed and state_dict is not None:
                    state_dict[shard_key(state_key, index, name)] = shards
                else:
                    full = shards.full_tensor()  # type: ignore[attr-defined]  # a collective: every rank
                    if own is not None:
                        own["emas"][index][name] = full
    if not ema.is_swapped or state_dict is None:
        return
    for name, raw in ema.raw_state_dict().items():
        raw_layout = sharding.get(name)
        if raw_layout is not None:
            raw = to_dtensor(raw, raw_layout)
            if not distributed:
                raw = raw.full_tensor()  # type: ignore[attr-defined]
        if name in state_dict:
            state_dict[name] = raw
