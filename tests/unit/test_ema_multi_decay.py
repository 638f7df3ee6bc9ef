"""Several decays in one ``EMA``: each EMA against its own plain float64 loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ema import EMA, EMAStateError
from lightning_ema.schedules import WarmupDecay


def make_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def perturb(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


def plain_loop(trajectory, decay_at, every_n, start_step):  # type: ignore[no-untyped-def]
    """Element-wise float64 EMA over recorded states: trajectory[0] is the state at step 0."""
    ema = {n: t.double().clone() for n, t in trajectory[0].items() if t.is_floating_point()}
    last = 0
    for step in range(1, len(trajectory)):
        if step % every_n:
            continue
        state = trajectory[step]
        if step <= start_step:
            ema = {n: state[n].double().clone() for n in ema}
        else:
            decay = math.prod(decay_at(s) for s in range(max(last, start_step) + 1, step + 1))
            ema = {n: decay * ema[n] + (1 - decay) * state[n].double() for n in ema}
        last = step
    return ema


@pytest.mark.parametrize(("every_n", "start_step"), [(1, 0), (3, 0), (2, 5)])
def test_each_ema_follows_its_own_decay(every_n: int, start_step: int) -> None:
    module = make_module()
    schedules = [0.9, WarmupDecay(decay=0.99, warmup=10)]
    references = [lambda t: 0.9, lambda t: min(0.99, (1 + t) / (10 + t))]
    model_ema = EMA(module, schedules, every_n_steps=every_n, start_step=start_step)
    trajectory = [{n: t.clone() for n, t in module.state_dict().items()}]
    for step in range(1, 25):
        perturb(module, step)
        trajectory.append({n: t.clone() for n, t in module.state_dict().items()})
        decay = model_ema.update(step)
        if step % every_n == 0:
            assert decay is not None
            assert len(model_ema.last_decays) == 2
    for index, decay_at in enumerate(references):
        expected = plain_loop(trajectory, decay_at, every_n, start_step)
        ema = model_ema.ema_state_dict(index)
        for name, value in expected.items():
            assert torch.allclose(ema[name].double(), value, atol=1e-6), (index, name)
    assert not torch.equal(model_ema.ema_state_dict(0)["0.weight"], model_ema.ema_state_dict(1)["0.weight"])


def test_swap_in_by_index_and_bit_exact_restore() -> None:
    module = make_module()
    model_ema = EMA(module, [0.5, 0.9])
    for step in range(1, 6):
        perturb(module, step)
        model_ema.update(step)
    raw = {n: t.clone() for n, t in module.state_dict().items()}
    second = {n: t.clone() for n, t in model_ema.ema_state_dict(1).items()}
    with model_ema.swapped(1):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, second[name]), name
        with pytest.raises(RuntimeError, match="swapped in"):
            model_ema.swap_in(0)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, raw[name]), name
    with pytest.raises(ValueError, match=r"`index`.*got 2"):
        model_ema.swap_in(2)


def test_state_round_trip_and_count_mismatch() -> None:
    module = make_module()
    model_ema = EMA(module, [0.5, 0.9])
    perturb(module, 1)
    model_ema.update(1)
    state = model_ema.state_dict()
    assert len(state["emas"]) == 2
    fresh = EMA(make_module(), [0.5, 0.9])
    fresh.load_state_dict(state)
    for index in (0, 1):
        for name, tensor in model_ema.ema_state_dict(index).items():
            assert torch.equal(fresh.ema_state_dict(index)[name], tensor)
    single = EMA(make_module(), 0.5)
    before = {n: t.clone() for n, t in single.ema_state_dict().items()}
    with pytest.raises(EMAStateError, match="holds 2 EMAs but 1 decays"):
        single.load_state_dict(state)
    for name, tensor in single.ema_state_dict().items():
        assert torch.equal(tensor, before[name])


def test_single_ema_layout_of_version_one_still_loads() -> None:
    module = make_module()
    legacy = {
        "num_updates": 4,
        "last_update_step": 4,
        "ema": {n: torch.full_like(t, 0.25) for n, t in module.state_dict().items()},
    }
    model_ema = EMA(module, 0.9)
    model_ema.load_state_dict(legacy)
    assert model_ema.num_updates == 4
    assert torch.equal(model_ema.ema_state_dict()["0.weight"], torch.full((4, 3), 0.25))


def test_relative_distance_is_the_closed_form() -> None:
    module = make_module()
    model_ema = EMA(module, [0.5, 0.9], buffers="ignore")
    for step in range(1, 4):
        perturb(module, step)
        model_ema.update(step)
    weights = {name: p.detach() for name, p in module.named_parameters()}
    denominator = math.sqrt(sum(float((w.double() ** 2).sum()) for w in weights.values()))
    for index, distance in enumerate(model_ema.relative_distances()):
        ema = model_ema.ema_state_dict(index)
        numerator = math.sqrt(sum(float(((ema[n].double() - w.double()) ** 2).sum()) for n, w in weights.items()))
        assert float(distance) == pytest.approx(numerator / denominator, rel=1e-5)
        assert distance.device == weights["0.weight"].device


@pytest.mark.parametrize("decay", [[], [0.9, 0.9], [0.9, 1.5]])
def test_bad_decay_lists(decay: list[float]) -> None:
    with pytest.raises(ValueError, match="`decay`"):
        EMA(make_module(), decay)


@pytest.mark.parametrize("block_bytes", [40, 100, 1 << 30])
def test_cache_blocked_update_equals_the_plain_loop(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    """Blocks smaller than a tensor split it into flat chunks; blocks larger than several tensors join them."""
    import lightning_ema._blocks as blocks_module

    monkeypatch.setattr(blocks_module, "BLOCK_BYTES", block_bytes)
    module = make_module()
    model_ema = EMA(module, [0.5, 0.9, 0.99], every_n_steps=1)
    groups = [group for group in model_ema._storage.groups if group.blocks]
    assert groups, "several decays must use the blocked update"
    if block_bytes == 40:  # 0.weight has 12 float32 elements = 48 bytes: split into chunks of 10 elements
        assert any(start is not None for group in groups for block in group.blocks for _, start, _ in block.pieces)
    trajectory = [{n: t.clone() for n, t in module.state_dict().items()}]
    for step in range(1, 12):
        perturb(module, step)
        trajectory.append({n: t.clone() for n, t in module.state_dict().items()})
        model_ema.update(step)
        with model_ema.swapped(step % 3):  # swap cycles re-point .data; the blocks must still hit the right storage
            pass
    for index, decay in enumerate([0.5, 0.9, 0.99]):
        expected = plain_loop(trajectory, lambda t, d=decay: d, 1, 0)
        for name, value in expected.items():
            assert torch.allclose(model_ema.ema_state_dict(index)[name].double(), value, atol=1e-6), (index, name)
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, trajectory[-1][name]), name
