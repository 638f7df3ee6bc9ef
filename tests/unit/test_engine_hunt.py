"""Defects found by a review of the engine (``lightning_ema.EMA``), each against a reference written out here.

- An EMA kept in a narrower dtype than its weights (``dtype=torch.float16`` of float32 weights, a float32 EMA of
  float64 weights) turned finite weights beyond its range into infinities: such an update must be refused like a
  non-finite weight, on every update path, leaving the EMA and the counters bit for bit as they were.
- ``relative_distances()`` inside a swap compared the EMA with itself (copy path) or divided by the EMA's norm
  (storage exchange) instead of comparing it with the raw weights.
- Bad ``target``, ``copy_to`` module, ``dtype`` and ``device`` arguments raised an ``AttributeError``, a
  ``NotImplementedError`` at the first update or torch's ``AssertionError`` instead of a ``ValueError`` naming them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from lightning_ema import EMA, NonFiniteUpdateError
from lightning_ema._groups import forced_path

PATHS = [None, "device", "deferred"]


def _module(values: Tensor, size: int = 0) -> nn.Module:
    """A parameter holding ``values`` and, if ``size``, a large one (screened alone, not packed)."""
    module = nn.Module()
    module.p = nn.Parameter(values.clone())
    if size:
        module.large = nn.Parameter(torch.linspace(-1.0, 1.0, size, dtype=values.dtype))
    return module


def _bits(ema: EMA) -> dict[str, bytes]:
    state = ema.ema_state_dict()
    return {name: bytes(tensor.contiguous().view(torch.uint8).tolist()) for name, tensor in state.items()}


# ================================================================================ EMA narrower than its weights


@pytest.mark.parametrize("path", PATHS, ids=["host", "device", "deferred"])
@pytest.mark.parametrize("size", [0, 300_000], ids=["small", "large"])
@pytest.mark.parametrize(
    ("weight_dtype", "ema_dtype", "too_large"),
    [
        (torch.float32, torch.float16, 1e6),
        (torch.float32, torch.float16, -7e4),
        (torch.bfloat16, torch.float16, 1e6),
        (torch.float64, torch.float32, 1e300),
        (torch.float64, torch.bfloat16, -1e300),
    ],
)
@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_a_weight_beyond_the_ema_dtype_is_refused_and_leaves_every_bit(
    path: str | None,
    size: int,
    weight_dtype: torch.dtype,
    ema_dtype: torch.dtype,
    too_large: float,
    nonfinite: str,
) -> None:
    module = _module(torch.tensor([1.0, 2.0, 3.0], dtype=weight_dtype), size)
    with forced_path(path):
        model_ema = EMA(module, decay=0.5, dtype=ema_dtype, nonfinite=nonfinite)  # type: ignore[arg-type]
    with torch.no_grad():
        module.p.add_(1.0)
    model_ema.update(1)
    before, counters = _bits(model_ema), (model_ema.num_updates, model_ema.last_update_step)
    with torch.no_grad():
        module.p[1] = too_large  # finite in the weights' dtype, infinite in the EMA's
    assert torch.isfinite(module.p).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if nonfinite == "error":
            with pytest.raises(NonFiniteUpdateError, match=r"\['p'\] hold NaN or infinity .*range.* step 2"):
                model_ema.update(2)
                model_ema.ema_state_dict()  # the accelerator paths report at the next read
        else:
            model_ema.update(2)
            model_ema.ema_state_dict()
            assert any("['p']" in str(warning.message) and "step 2" in str(warning.message) for warning in caught)
    assert _bits(model_ema) == before
    assert (model_ema.num_updates, model_ema.last_update_step) == counters
    assert all(torch.isfinite(tensor).all() for tensor in model_ema.ema_state_dict().values())


@pytest.mark.parametrize("path", PATHS, ids=["host", "device", "deferred"])
def test_large_weights_within_the_ema_dtype_are_averaged(path: str | None) -> None:
    """The range check must not refuse what the EMA can hold: 60000 fits float16 (largest finite 65504)."""
    module = _module(torch.tensor([1.0, -60000.0, 65504.0]))
    with forced_path(path):
        model_ema = EMA(module, decay=0.5, dtype=torch.float16)
    start = [1.0, -60000.0, 65504.0]
    with torch.no_grad():
        module.p.copy_(torch.tensor([3.0, -64000.0, 65000.0]))
    assert model_ema.update(1) == 0.5
    expected = [0.5 * a + 0.5 * b for a, b in zip(start, [3.0, -64000.0, 65000.0], strict=True)]
    got = model_ema.ema_state_dict()["p"].double().tolist()
    assert model_ema.num_updates == 1
    assert all(math.isclose(g, e, rel_tol=1e-3) for g, e in zip(got, expected, strict=True)), (got, expected)


# ================================================================================ relative distances in a swap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["exchange", "copy"])
def test_relative_distances_inside_a_swap_compare_the_ema_with_the_raw_weights(dtype: torch.dtype) -> None:
    module = _module(torch.tensor([1.0, 2.0, -4.0], dtype=dtype))
    model_ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.p.add_(8.0)
    model_ema.update()
    with torch.no_grad():
        module.p.add_(8.0)
    raw = module.p.detach().double().clone()
    ema = model_ema.ema_state_dict()["p"].double().clone()
    expected = float((ema - raw).norm() / raw.norm())
    (outside,) = model_ema.relative_distances()
    with model_ema.swapped():
        (inside,) = model_ema.relative_distances()
    assert math.isclose(float(outside), expected, rel_tol=1e-5)
    assert math.isclose(float(inside), expected, rel_tol=1e-5), (float(inside), expected)


# ================================================================================ bad arguments


def test_a_target_that_is_not_a_module_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"`target` must be None or a torch.nn.Module, got 3"):
        EMA(nn.Linear(2, 2), target=3)  # type: ignore[arg-type]


def test_copy_to_something_that_is_not_a_module_is_a_value_error_naming_it() -> None:
    model_ema = EMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"`module` must be None or a torch.nn.Module, got 'model.pt'"):
        model_ema.copy_to("model.pt")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, "float8_e4m3fn"])
def test_a_dtype_the_ema_cannot_average_in_is_refused_at_construction(dtype: object) -> None:
    with pytest.raises(ValueError, match=r"`dtype` must be .*float8_e"):
        EMA(nn.Linear(2, 2), dtype=dtype)  # type: ignore[arg-type]


def test_a_device_this_process_cannot_use_is_a_value_error_naming_it() -> None:
    device = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(ValueError, match=rf"`device` must be .*got '{device}'"):
        EMA(nn.Linear(2, 2), device=device)


def test_numpy_integers_count_as_steps_and_intervals_and_are_stored_as_ints() -> None:
    np = pytest.importorskip("numpy")

    module = nn.Linear(3, 2)
    ema = EMA(module, decay=0.5, every_n_steps=np.int64(2))
    assert ema.update(np.int64(2)) == 0.5 and type(ema.step) is int and ema.step == 2
    assert type(ema.state_dict()["step"]) is int
    for bad in (2.0, True, torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="`step` must be an integer"):
            ema.update(bad)  # type: ignore[arg-type]
