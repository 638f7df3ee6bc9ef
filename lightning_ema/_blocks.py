"""Cache-sized blocks of a storage group, so that each weight is read from memory once for every EMA.

Pure torch. With several decays, or weights of another dtype than their EMA (widened into a scratch buffer first),
an update makes several passes over each weight. Cut into blocks of :data:`BLOCK_BYTES`, the passes run block by
block: what the first brought into the cache is still there for the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ema import functional as F

__all__ = ["BLOCK_BYTES", "Block", "blocks"]

#: Bytes of weights per block: well inside a core's L2 + L3 share, so what one kernel brought into the cache is
#: still there for the next.
BLOCK_BYTES = 4 * 2**20

#: (position in the group, start, stop): a whole tensor (``start`` is ``None``) or a flat chunk of a large one.
_Piece = tuple[int, int | None, int | None]


def _view(tensors: list[Tensor], piece: _Piece) -> Tensor:
    position, start, stop = piece
    return tensors[position] if start is None else tensors[position].view(-1)[start:stop]


def _cut(live: list[Tensor], positions: Sequence[int], block_bytes: int) -> list[_Piece]:
    """Pieces of the tensors at ``positions``: whole tensors, and flat chunks of large contiguous ones."""
    pieces: list[_Piece] = []
    for position in positions:
        tensor = live[position]
        size = tensor.element_size()
        if tensor.numel() * size > block_bytes and tensor.is_contiguous():
            step = max(1, block_bytes // size)
            pieces += [(position, a, min(a + step, tensor.numel())) for a in range(0, tensor.numel(), step)]
        else:
            pieces.append((position, None, None))
    return pieces


@dataclass
class Block:
    """A slice of a group small enough to stay in cache while every EMA of it is updated.

    ``pieces`` are (position in the group, start, stop): a whole tensor (``start`` is ``None``) or a flat chunk
    of a large one. The weights' views are made at each update from the group's live tensor objects, so they
    follow a re-pointed ``.data``; the EMA views are made once (the EMA's storage outlives every swap).
    ``scratch`` (weights of another dtype than the EMA) receives the widened weights of the block.
    """

    pieces: list[_Piece]
    emas: list[list[Tensor]]
    scratch: list[Tensor] | None = None

    def weights(self, sources: list[Tensor]) -> list[Tensor]:
        """The block's weights, widened to the EMA's dtype if the group needs it."""
        views = [_view(sources, piece) for piece in self.pieces]
        if self.scratch is None:
            return views
        F.copy_(self.scratch, views)
        return self.scratch


def blocks(live: list[Tensor], emas: list[list[Tensor]], widen: bool) -> list[Block]:
    """Cut a group (its weights ``live`` and, per EMA, its tensors ``emas``) into blocks of about :data:`BLOCK_BYTES`.

    A large tensor's chunks each make a block of their own; small tensors are gathered until a block is full.
    ``widen``: each block gets a scratch buffer of the EMA's dtype for the weights (see :attr:`Block.scratch`).
    """
    block_bytes = BLOCK_BYTES
    result: list[Block] = []
    pieces: list[_Piece] = []
    size = 0

    def close() -> None:
        nonlocal pieces, size
        if pieces:
            views = [[_view(ema, piece) for piece in pieces] for ema in emas]
            scratch = [torch.empty_like(view) for view in views[0]] if widen else None
            result.append(Block(pieces, views, scratch))
        pieces, size = [], 0

    for piece in _cut(live, range(len(live)), block_bytes):
        position, start, _ = piece
        if start is not None:
            close()
            pieces.append(piece)
            close()
            continue
        pieces.append(piece)
        size += live[position].numel() * live[position].element_size()
        if size >= block_bytes:
            close()
    close()
    return result
