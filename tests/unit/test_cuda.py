"""The accelerator paths on a real CUDA device (skipped without one).

No host synchronisation in an update (``torch.cuda.set_sync_debug_mode("error")`` turns any into an error),
stream ordering with the side stream (a read right after an update sees it), the pinned offload path, and
bfloat16 weights with a float32 EMA, each against a float64 reference computed on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from lightning_ema import EMA, NonFiniteUpdateError

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NAN = float("nan")


def make_net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    return net.to(device="cuda", dtype=dtype)


@torch.no_grad()
def perturb(module: nn.Module, seed: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for tensor in module.state_dict(keep_vars=True).values():
        if tensor.is_floating_point():
            tensor.copy_(torch.randn(tensor.shape, generator=generator, device="cuda", dtype=tensor.dtype))


def reference(states: list[dict[str, Tensor]], decay: float) -> dict[str, Tensor]:
    """The EMA in float64 on the CPU, from the weights before each update."""
    ema = {name: tensor.double().cpu() for name, tensor in states[0].items() if tensor.is_floating_point()}
    for state in states[1:]:
        for name in ema:
            ema[name] = decay * ema[name] + (1 - decay) * state[name].double().cpu()
    return ema


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float) -> None:
    for name, value in expected.items():
        error = (actual[name].double().cpu() - value).abs().max().item()
        assert error <= atol, (name, error)


@contextmanager
def no_sync() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("nonfinite", ["error", "skip", "ignore"])
def test_updates_do_not_synchronise_and_match_the_reference(nonfinite: str) -> None:
    net = make_net()
    model_ema = EMA(net, decay=0.9, nonfinite=nonfinite)  # type: ignore[arg-type]
    assert model_ema._storage.path == "device"
    states = [snapshot(net)]
    for step in range(1, 8):
        perturb(net, step)
        states.append(snapshot(net))
        with no_sync():
            model_ema.update(step)
    assert_close(model_ema.ema_state_dict(), reference(states, 0.9), atol=1e-5)


def test_a_nonfinite_weight_is_skipped_on_the_device_and_reported_later() -> None:
    net = make_net()
    model_ema = EMA(net, decay=0.9, nonfinite="skip")
    states = [snapshot(net)]
    for step in (1, 2):
        perturb(net, step)
        states.append(snapshot(net))
        model_ema.update(step)
    perturb(net, 3)
    with torch.no_grad():
        net[0].weight[0, 0] = NAN
    with no_sync():
        model_ema.update(3)  # skipped on the device; the host does not know yet
    with pytest.warns(RuntimeWarning, match=r"0\.weight.*step 3"):
        ema = model_ema.ema_state_dict()
    assert_close(ema, reference(states, 0.9), atol=1e-5)
    assert model_ema.num_updates == 2


def test_error_is_raised_at_the_next_update() -> None:
    net = make_net()
    model_ema = EMA(net, decay=0.9)
    perturb(net, 1)
    model_ema.update(1)
    with torch.no_grad():
        net[3].bias[0] = float("inf")
    model_ema.update(2)
    with pytest.raises(NonFiniteUpdateError, match=r"3\.bias.*step 2"):
        model_ema.update(3)
    assert torch.isfinite(model_ema.ema_state_dict()["3.bias"]).all()


def test_side_stream_update_is_seen_by_a_read_right_after_it() -> None:
    net = make_net()
    model_ema = EMA(net, decay=0.5)
    model_ema.use_side_stream()
    assert model_ema._storage.side.stream is not None
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    states = [snapshot(net)]
    x = torch.randn(512, 64, device="cuda")
    for step in range(1, 6):
        loss = net(x).square().mean()
        loss.backward()
        optimizer.step()  # waits, on the device, for the previous update's reads of the weights
        optimizer.zero_grad()
        states.append(snapshot(net))
        with no_sync():
            model_ema.update(step)
        # Read right away: the read waits for the side stream (on the device) before copying.
        assert_close(model_ema.ema_state_dict(), reference(states, 0.5), atol=1e-5)


def test_offloaded_ema_is_pinned_and_updated_from_non_blocking_copies() -> None:
    net = make_net()
    model_ema = EMA(net, decay=0.9, device="cpu")
    storage = model_ema._storage
    assert storage.path == "deferred"
    assert all(e.is_pinned() for group in storage.groups for e in group.emas[0])
    assert all(s.is_pinned() for group in storage.groups for s in group.staging or [])
    states = [snapshot(net)]
    for step in range(1, 6):
        perturb(net, step)
        states.append(snapshot(net))
        with no_sync():
            model_ema.update(step)  # stages the weights; the previous update is applied on the host
    ema = model_ema.ema_state_dict()
    assert all(tensor.device.type == "cpu" for tensor in ema.values())
    assert_close(ema, reference(states, 0.9), atol=1e-5)


def test_bfloat16_weights_with_a_float32_ema() -> None:
    net = make_net(torch.bfloat16)
    model_ema = EMA(net, decay=0.99)
    assert all(
        tensor.dtype == torch.float32 for tensor in model_ema.ema_state_dict().values() if tensor.is_floating_point()
    )
    states = [snapshot(net)]
    for step in range(1, 6):
        perturb(net, step)
        states.append(snapshot(net))
        with no_sync():
            model_ema.update(step)
    # The reference lerps towards the bf16 weights exactly widened, as the EMA does.
    assert_close(model_ema.ema_state_dict(), reference(states, 0.99), atol=1e-5)
