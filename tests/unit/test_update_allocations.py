"""What README "Performance" says an update allocates, counted with a TorchDispatchMode (issue 13, case 7).

Every aten call an update makes passes through the mode; a result whose storage none of the call's inputs share is
a tensor the update created.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_ema import EMA


class NewTensors(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        self.count += sum(
            1
            for t in tree_flatten(out)[0]
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages
        )
        return out


def count_update(decay: Any, nonfinite: str, layers: int = 100) -> int:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    ema = EMA(model, decay, nonfinite=nonfinite)
    ema.update(1)
    with NewTensors() as counter:
        ema.update(2)
    return counter.count


@pytest.mark.parametrize("decay", [0.99, [0.99, 0.999]], ids=["one decay", "two decays"])
def test_an_unchecked_update_creates_no_tensor(decay: Any) -> None:
    assert count_update(decay, "ignore") == 0


@pytest.mark.parametrize("decay", [0.99, [0.99, 0.999]], ids=["one decay", "two decays"])
def test_the_default_check_creates_no_tensor_either(decay: Any) -> None:
    # README "Performance": on CPU the check's sums land in preallocated slots, the small tensors are concatenated
    # into a preallocated buffer (issue 14). Change README with this figure.
    assert count_update(decay, "error", layers=100) == 0
