"""The non-finite screen of the host path: one read of every checked weight before anything is written.

Pure torch. The screen of a tensor is its sum (float16: its minimum and maximum), written into preallocated 0-d
slots (:func:`lightning_ema.functional.screen_into_`). Tensors up to :data:`SMALL_BYTES` are screened together,
concatenated into one preallocated buffer: one kernel instead of hundreds. A non-finite slot says only "look
closer" (a finite sum can overflow); the exact check of its tensors decides and names them. For an EMA narrower
than its weights the screen is the minimum and maximum, and a magnitude beyond the EMA's range is suspicious too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_ema import functional as F

__all__ = ["SMALL_BYTES", "HostScreen"]

#: Tensors up to this size are screened together, concatenated into one buffer: one kernel instead of hundreds.
SMALL_BYTES = 256 * 2**10


class HostScreen:
    """The screen of one group's checked tensors: the large ones one by one, the small ones concatenated.

    Args:
        sources: the tensors an update reads (the weights, or their staged copies).
        checked: the positions in ``sources`` of the tensors to screen (floating point, not empty).
        limit: the largest magnitude the EMA can hold (:func:`lightning_ema.functional.range_limit`).

    Everything is allocated here, so that :meth:`suspicious` allocates nothing.
    """

    def __init__(self, sources: list[Tensor], checked: list[int], limit: float = math.inf) -> None:
        self.limit = limit
        #: Positions screened together (concatenated into :attr:`pack`) and one by one.
        self.small = [i for i in checked if sources[i].numel() * sources[i].element_size() <= SMALL_BYTES]
        self.alone = [i for i in checked if i not in set(self.small)]
        source = sources[0]
        self.pack: Tensor | None = None
        if self.small:
            self.pack = torch.empty(sum(sources[i].numel() for i in self.small), dtype=source.dtype)
            self.pack = self.pack.to(source.device)
        # A pair of 0-d slots per tensor screened alone, and one for the pack (the last).
        self.sums = torch.zeros(len(self.alone) + bool(self.small), 2, dtype=source.dtype, device=source.device)
        self.slots = [(row[0], row[1]) for row in self.sums.unbind()]

    def suspicious(self, sources: list[Tensor]) -> list[int]:
        """Screen the tensors (one read each) and return the positions of those whose slot is not finite.

        The host reads the group's slots once (one small list): the only synchronisation.
        """
        tensors = [sources[i] for i in self.alone]
        if self.pack is not None:
            tensors.append(torch.cat([sources[i].reshape(-1) for i in self.small], out=self.pack))
        limit = self.limit
        F.screen_into_(tensors, self.slots, extremes=not math.isinf(limit))
        positions = []
        for index, (first, second) in enumerate(self.sums.tolist()):
            if math.isinf(limit):
                suspicious = not (math.isfinite(first) and math.isfinite(second))
            else:  # (minimum, maximum), compared in double; NaN compares False
                suspicious = not (-limit <= first and second <= limit)
            if suspicious:
                positions += [self.alone[index]] if index < len(self.alone) else self.small
        return positions
