"""Tests of the public ``EMA`` against EMAs recomputed here by plain loops in float64.

Selection, dtypes and devices, the update rule (schedules, ``every_n_steps`` products, ``start_step`` copies),
non-finite weights, swaps, ``copy_to``, ``state_dict`` and argument checks.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_ema import EMA, EMAStateError, NonFiniteUpdateError
from lightning_ema.ema import EMAConfig
from lightning_ema.schedules import WarmupDecay

NAN = float("nan")

# state_dict names of Net, by how the EMA treats them with buffers="average"
PARAMETERS = ["fc.weight", "fc.bias", "bn.weight", "bn.bias", "head.weight", "decoder.weight", "frozen"]
FLOAT_BUFFERS = ["bn.running_mean", "bn.running_var"]
INT_BUFFERS = ["bn.num_batches_tracked"]
ALL_NAMES = PARAMETERS + FLOAT_BUFFERS + INT_BUFFERS
AVERAGED = PARAMETERS + FLOAT_BUFFERS


class Net(nn.Module):
    """Linear, BatchNorm1d, a tied weight, a non-persistent buffer and a frozen parameter."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 3, bias=False)
        self.decoder = nn.Linear(3, 3, bias=False)
        self.decoder.weight = self.head.weight  # tied: two names, one Parameter
        self.frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
        self.register_buffer("scratch", torch.zeros(5), persistent=False)
        randomize(self, seed)
        self.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.head(self.bn(self.fc(x)))) + self.frozen.sum()


class Wrapped(nn.Module):
    """Puts a module under a wrapper attribute, as torch.compile (`_orig_mod`) or DDP (`module`) do."""

    def __init__(self, inner: nn.Module, attribute: str = "_orig_mod") -> None:
        super().__init__()
        setattr(self, attribute, inner)


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """Give every floating tensor of the state_dict new values and advance integer buffers by one."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for tensor in module.state_dict(keep_vars=True).values():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.is_floating_point():
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            tensor.copy_(values.abs() + 0.5 if tensor.dim() == 1 and tensor.numel() == 3 else values)
        else:
            tensor.add_(1)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def assert_equal_states(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        error = (actual[name].double() - value.double()).abs().max().item()
        assert error <= atol, f"{name}: max error {error}"


def reference_run(
    initial: dict[str, Tensor],
    states: dict[int, dict[str, Tensor]],
    decay_at: Callable[[int], float],
    update_steps: list[int],
    *,
    start_step: int = 0,
    averaged: list[str],
    copied: list[str],
    initial_step: int = 0,
) -> dict[str, Tensor]:
    """The EMA, in float64, after updates at ``update_steps`` with the weights ``states[step]``.

    Updates at steps up to ``start_step`` copy; a later update multiplies the decays of every step since the
    previous update (or since ``start_step``).
    """
    ema = {name: initial[name].double().clone() for name in averaged}
    ema.update({name: initial[name].clone() for name in copied})
    last = initial_step
    for step in update_steps:
        state = states[step]
        if step <= start_step:
            ema = {name: state[name].double().clone() for name in averaged}
        else:
            product = 1.0
            for s in range(max(last, start_step) + 1, step + 1):
                product *= decay_at(s)
            ema = {name: product * ema[name] + (1.0 - product) * state[name].double() for name in averaged}
        ema.update({name: state[name].clone() for name in copied})
        last = step
    return ema


def warmup(decay: float, warmup_steps: float) -> Callable[[int], float]:
    return lambda t: min(decay, (1.0 + t) / (warmup_steps + t))


def train(module: nn.Module, model_ema: EMA, steps: list[int], seed: int = 100) -> dict[int, object]:
    """Change the weights before each step and call update; return what update returned by step."""
    results: dict[int, object] = {}
    for step in steps:
        randomize(module, seed + step)
        results[step] = model_ema.update(step)
    return results


def record(module: nn.Module, model_ema: EMA, steps: list[int], seed: int = 100) -> dict[int, dict[str, Tensor]]:
    """Like train, but return the weights seen by each step."""
    states = {}
    for step in steps:
        randomize(module, seed + step)
        states[step] = snapshot(module)
        model_ema.update(step)
    return states


def make(module: nn.Module | None = None, step: int = 0, **kwargs: object) -> tuple[nn.Module, EMA]:
    """A module and its EMA, started at optimizer step ``step`` (``EMA(module, ...)`` when ``step`` is 0)."""
    module = module if module is not None else Net()
    if step:
        return module, EMA.from_config(module, EMAConfig.create(**kwargs), step=step)  # type: ignore[arg-type]
    return module, EMA(module, **kwargs)  # type: ignore[arg-type]


# ============================================================================================ selection


def test_selects_parameters_and_buffers_by_state_dict_name() -> None:
    module, model_ema = make(decay=0.9)
    ema = model_ema.ema_state_dict()
    assert sorted(ema) == sorted(ALL_NAMES)
    assert "scratch" not in ema  # non-persistent buffers are not in the state_dict
    assert_equal_states(ema, snapshot(module))  # the EMA starts as a copy
    # a copy, not the module's storage
    for name, tensor in module.state_dict().items():
        assert ema[name].data_ptr() != tensor.data_ptr(), name


def test_frozen_parameter_is_averaged() -> None:
    module, model_ema = make(decay=0.5)
    before = module.frozen.detach().double().clone()
    randomize(module, 7)
    model_ema.update(1)
    expected = 0.5 * before + 0.5 * module.frozen.detach().double()
    assert_close({"frozen": model_ema.ema_state_dict()["frozen"]}, {"frozen": expected}, atol=1e-6)


def test_parameters_and_float_buffers_are_averaged_integer_buffers_copied() -> None:
    module, model_ema = make(decay=0.9)
    initial = snapshot(module)
    states = record(module, model_ema, [1, 2, 3])
    expected = reference_run(initial, states, lambda t: 0.9, [1, 2, 3], averaged=AVERAGED, copied=INT_BUFFERS)
    ema = model_ema.ema_state_dict()
    assert_close(ema, expected)
    assert ema["bn.num_batches_tracked"].dtype == torch.int64
    # Net() advanced it once at construction, each step once more
    assert ema["bn.num_batches_tracked"].item() == states[3]["bn.num_batches_tracked"].item() == 4


def test_buffers_copy_copies_every_buffer() -> None:
    module, model_ema = make(decay=0.9, buffers="copy")
    initial = snapshot(module)
    states = record(module, model_ema, [1, 2])
    expected = reference_run(
        initial, states, lambda t: 0.9, [1, 2], averaged=PARAMETERS, copied=FLOAT_BUFFERS + INT_BUFFERS
    )
    ema = model_ema.ema_state_dict()
    assert_close(ema, expected)
    for name in FLOAT_BUFFERS + INT_BUFFERS:
        assert torch.equal(ema[name], states[2][name]), name


def test_buffers_ignore_leaves_buffers_out() -> None:
    module, model_ema = make(decay=0.9, buffers="ignore")
    assert sorted(model_ema.ema_state_dict()) == sorted(PARAMETERS)
    initial = snapshot(module)
    states = record(module, model_ema, [1])
    assert_close(
        model_ema.ema_state_dict(),
        reference_run(initial, states, lambda t: 0.9, [1], averaged=PARAMETERS, copied=[]),
    )


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["fc.*"], None, ["fc.weight", "fc.bias"]),
        ("fc.*", None, ["fc.weight", "fc.bias"]),
        (None, ["bn.*", "frozen"], ["fc.weight", "fc.bias", "head.weight", "decoder.weight"]),
        (["*.weight"], ["bn.*"], ["fc.weight", "head.weight", "decoder.weight"]),
        (["bn.*"], None, ["bn.weight", "bn.bias", *FLOAT_BUFFERS, *INT_BUFFERS]),
        (["head.weight"], None, ["head.weight"]),
    ],
)
@pytest.mark.parametrize("wrapper", [None, "_orig_mod", "module", "_forward_module"])
def test_include_exclude_on_canonical_names(
    include: list[str] | str | None, exclude: list[str] | None, expected: list[str], wrapper: str | None
) -> None:
    module: nn.Module = Net()
    prefix = ""
    if wrapper is not None:
        module = Wrapped(module, wrapper)
        prefix = wrapper + "."
    _, model_ema = make(module, decay=0.9, include=include, exclude=exclude)
    assert sorted(model_ema.ema_state_dict()) == sorted(prefix + name for name in expected)


def test_tied_weight_appears_under_both_names_and_shares_one_ema_tensor() -> None:
    module, model_ema = make(decay=0.5)
    ema = model_ema.ema_state_dict()
    assert "head.weight" in ema and "decoder.weight" in ema
    assert ema["head.weight"].data_ptr() == ema["decoder.weight"].data_ptr()
    before = ema["head.weight"].double().clone()
    randomize(module, 3)
    model_ema.update(1)
    ema = model_ema.ema_state_dict()
    assert torch.equal(ema["head.weight"], ema["decoder.weight"])
    expected = 0.5 * before + 0.5 * module.head.weight.detach().double()
    assert_close({"w": ema["head.weight"]}, {"w": expected}, atol=1e-6)  # averaged once, not twice


def test_tied_weight_only_one_name_selected() -> None:
    _, model_ema = make(decay=0.9, include=["decoder.*"])
    assert list(model_ema.ema_state_dict()) == ["decoder.weight"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"include": ["nothing.*"]},
        {"exclude": ["*"]},
        {"include": ["bn.running_*"], "buffers": "ignore"},
        {"include": ["fc.*"], "exclude": ["fc.*"]},
    ],
)
def test_nothing_selected_raises(kwargs: dict[str, object]) -> None:
    with pytest.raises(EMAStateError, match="No tensors of the module are selected"):
        EMA(Net(), 0.9, **kwargs)  # type: ignore[arg-type]


def test_module_without_state_raises() -> None:
    with pytest.raises(EMAStateError):
        EMA(nn.ReLU(), 0.9)


# ============================================================================================ dtype and device


def test_float32_weights_give_float32_ema() -> None:
    _, model_ema = make(decay=0.9)
    for name, tensor in model_ema.ema_state_dict().items():
        expected = torch.int64 if name in INT_BUFFERS else torch.float32
        assert tensor.dtype == expected, name
        assert tensor.device.type == "cpu"


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_weights_give_float32_ema(half: torch.dtype) -> None:
    module, model_ema = make(Net(dtype=half), decay=0.9)
    ema = model_ema.ema_state_dict()
    for name in AVERAGED:
        assert ema[name].dtype == torch.float32, name
        assert torch.equal(ema[name], module.state_dict()[name].float()), name
    assert ema["bn.num_batches_tracked"].dtype == torch.int64
    # the module itself is untouched
    assert module.fc.weight.dtype == half


@pytest.mark.parametrize("dtype", ["float64", torch.float64, "torch.float64", "double"])
def test_requested_dtype(dtype: str | torch.dtype) -> None:
    module, model_ema = make(Net(dtype=torch.bfloat16), decay=0.9, dtype=dtype)
    assert model_ema.config.dtype == torch.float64
    ema = model_ema.ema_state_dict()
    for name in AVERAGED:
        assert ema[name].dtype == torch.float64, name
    assert ema["bn.num_batches_tracked"].dtype == torch.int64
    initial = snapshot(module)
    states = record(module, model_ema, [1, 2])
    expected = reference_run(initial, states, lambda t: 0.9, [1, 2], averaged=AVERAGED, copied=INT_BUFFERS)
    assert_close(ema, expected, atol=1e-12)


def test_requested_dtype_applies_to_averaged_not_copied_buffers() -> None:
    _, model_ema = make(decay=0.9, dtype="float64", buffers="copy")
    ema = model_ema.ema_state_dict()
    for name in PARAMETERS:
        assert ema[name].dtype == torch.float64
    for name in FLOAT_BUFFERS:
        assert ema[name].dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_cpu(device: str | torch.device) -> None:
    module, model_ema = make(decay=0.9, device=device)
    assert model_ema.config.device == torch.device("cpu")
    for tensor in model_ema.ema_state_dict().values():
        assert tensor.device == torch.device("cpu")
    initial = snapshot(module)
    states = record(module, model_ema, [1])
    assert_close(
        model_ema.ema_state_dict(),
        reference_run(initial, states, lambda t: 0.9, [1], averaged=AVERAGED, copied=INT_BUFFERS),
    )


# ============================================================================================ update semantics


@pytest.mark.parametrize(
    ("decay", "decay_at"),
    [
        (0.9, lambda t: 0.9),
        (0.0, lambda t: 0.0),
        (WarmupDecay(0.99, 10), warmup(0.99, 10)),
        (WarmupDecay(0.8, 3), warmup(0.8, 3)),
    ],
)
def test_update_every_step_matches_reference(decay: object, decay_at: Callable[[int], float]) -> None:
    module, model_ema = make(decay=decay)
    initial = snapshot(module)
    steps = list(range(1, 16))
    states: dict[int, dict[str, Tensor]] = {}
    for step in steps:
        randomize(module, 200 + step)
        states[step] = snapshot(module)
        returned = model_ema.update(step)
        assert returned == pytest.approx(decay_at(step), rel=1e-15, abs=0.0)
        assert model_ema.num_updates == step
        assert model_ema.last_update_step == step
    expected = reference_run(initial, states, decay_at, steps, averaged=AVERAGED, copied=INT_BUFFERS)
    assert_close(model_ema.ema_state_dict(), expected)


def test_warmup_decay_values_returned() -> None:
    _, model_ema = make(decay=WarmupDecay(0.999, 10))
    results = [model_ema.update(step) for step in (1, 10, 100, 10_000)]
    # min(0.999, (1 + t) / (10 + t)) written out
    assert results == pytest.approx([2 / 11, 11 / 20, 101 / 110, 0.999], rel=1e-15)


@pytest.mark.parametrize("every_n_steps", [2, 3, 5])
def test_every_n_steps_updates_on_multiples_with_product_of_decays(every_n_steps: int) -> None:
    decay_at = warmup(0.95, 4)
    module, model_ema = make(decay=WarmupDecay(0.95, 4), every_n_steps=every_n_steps)
    initial = snapshot(module)
    states: dict[int, dict[str, Tensor]] = {}
    update_steps = []
    for step in range(1, 17):
        randomize(module, 300 + step)
        states[step] = snapshot(module)
        returned = model_ema.update(step)
        if step % every_n_steps == 0:
            update_steps.append(step)
            assert returned == pytest.approx(decay_at(step), rel=1e-15)
        else:
            assert returned is None
        assert model_ema.num_updates == len(update_steps)
        assert model_ema.last_update_step == (update_steps[-1] if update_steps else 0)
    expected = reference_run(initial, states, decay_at, update_steps, averaged=AVERAGED, copied=INT_BUFFERS)
    assert_close(model_ema.ema_state_dict(), expected)


def test_every_n_steps_with_irregular_step_numbers() -> None:
    # update is called with steps that jump; an update happens when a multiple of 3 lies in (last, step]
    module, model_ema = make(decay=0.9, every_n_steps=3)
    initial = snapshot(module)
    calls = [2, 4, 5, 7, 8, 9, 13, 14]
    due = {2: False, 4: True, 5: False, 7: True, 8: False, 9: True, 13: True, 14: False}
    states: dict[int, dict[str, Tensor]] = {}
    updated = []
    for step in calls:
        randomize(module, 400 + step)
        states[step] = snapshot(module)
        returned = model_ema.update(step)
        assert (returned is not None) is due[step], step
        if due[step]:
            updated.append(step)
            assert returned == 0.9
    assert model_ema.num_updates == 4 and model_ema.last_update_step == 13
    # products: 0.9**4 at step 4, 0.9**3 at 7, 0.9**2 at 9, 0.9**4 at 13
    expected = {name: initial[name].double() for name in AVERAGED}
    for step, power in zip(updated, [4, 3, 2, 4], strict=True):
        product = 0.9**power
        expected = {n: product * expected[n] + (1 - product) * states[step][n].double() for n in AVERAGED}
    expected.update({name: states[13][name] for name in INT_BUFFERS})
    assert_close(model_ema.ema_state_dict(), expected)


def test_skipped_step_numbers_apply_product_with_every_step() -> None:
    module, model_ema = make(decay=0.8)
    before = {name: t.double().clone() for name, t in model_ema.ema_state_dict().items()}
    randomize(module, 5)
    assert model_ema.update(4) == 0.8
    expected = {n: 0.8**4 * before[n] + (1 - 0.8**4) * module.state_dict()[n].double() for n in AVERAGED}
    ema = model_ema.ema_state_dict()
    assert_close({n: ema[n] for n in AVERAGED}, expected)
    assert model_ema.num_updates == 1 and model_ema.last_update_step == 4


def test_start_step_copies_then_averages_from_the_step_after() -> None:
    decay_at = warmup(0.9, 2)
    module, model_ema = make(decay=WarmupDecay(0.9, 2), start_step=4)
    states: dict[int, dict[str, Tensor]] = {}
    for step in range(1, 9):
        randomize(module, 500 + step)
        states[step] = snapshot(module)
        returned = model_ema.update(step)
        if step <= 4:
            assert returned == 0.0
            assert_equal_states(model_ema.ema_state_dict(), {k: v for k, v in states[step].items() if k in ALL_NAMES})
        else:
            assert returned == pytest.approx(decay_at(step), rel=1e-15)
        assert model_ema.num_updates == step
    # explicit: ema_4 = w_4, then one decay per step from step 5 on
    expected = {n: states[4][n].double() for n in AVERAGED}
    for step in range(5, 9):
        d = decay_at(step)
        expected = {n: d * expected[n] + (1 - d) * states[step][n].double() for n in AVERAGED}
    expected.update({name: states[8][name] for name in INT_BUFFERS})
    assert_close(model_ema.ema_state_dict(), expected)


def test_start_step_with_every_n_steps_uses_product_after_start_step() -> None:
    decay_at = warmup(0.95, 3)
    module, model_ema = make(decay=WarmupDecay(0.95, 3), every_n_steps=3, start_step=4)
    states: dict[int, dict[str, Tensor]] = {}
    returned = {}
    for step in range(1, 13):
        randomize(module, 600 + step)
        states[step] = snapshot(module)
        returned[step] = model_ema.update(step)
    assert [step for step, value in returned.items() if value is not None] == [3, 6, 9, 12]
    assert returned[3] == 0.0
    assert returned[6] == pytest.approx(decay_at(6), rel=1e-15)
    # step 3 copies; step 6 covers steps 5 and 6 only (steps up to start_step are not multiplied in)
    expected = {n: states[3][n].double() for n in AVERAGED}
    for step, covered in ((6, (5, 6)), (9, (7, 8, 9)), (12, (10, 11, 12))):
        product = math.prod(decay_at(s) for s in covered)
        expected = {n: product * expected[n] + (1 - product) * states[step][n].double() for n in AVERAGED}
    expected.update({name: states[12][name] for name in INT_BUFFERS})
    assert_close(model_ema.ema_state_dict(), expected)
    assert model_ema.num_updates == 4 and model_ema.last_update_step == 12


def test_same_step_twice_does_nothing_the_second_time() -> None:
    module, model_ema = make(decay=0.5)
    randomize(module, 1)
    assert model_ema.update(3) == 0.5
    first = clone_state(model_ema.ema_state_dict())
    randomize(module, 2)
    assert model_ema.update(3) is None
    with pytest.raises(ValueError, match=r"`step` must be an integer >= the last step seen \(3\), got 2\."):
        model_ema.update(2)  # a step going backwards is a mistake of the loop, not "no update due"
    assert_equal_states(model_ema.ema_state_dict(), first)
    assert model_ema.num_updates == 1 and model_ema.last_update_step == 3 and model_ema.step == 3


def test_start_step_of_from_config_is_the_starting_point() -> None:
    module, model_ema = make(step=10, decay=0.5)
    assert model_ema.last_update_step == 10 and model_ema.num_updates == 0
    initial = clone_state(model_ema.ema_state_dict())
    randomize(module, 1)
    assert model_ema.update(10) is None
    assert_equal_states(model_ema.ema_state_dict(), initial)
    assert model_ema.update(11) == 0.5
    assert model_ema.num_updates == 1 and model_ema.last_update_step == 11


def test_bf16_weights_move_a_float32_ema_that_bf16_arithmetic_would_freeze() -> None:
    module = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.fill_(-1.0)
    model_ema = EMA(module, 0.9999)
    with torch.no_grad():
        module.weight.fill_(2.0)
        module.bias.fill_(-3.0)
    plain_bf16 = {"weight": torch.ones(8, 8, dtype=torch.bfloat16), "bias": -torch.ones(8, dtype=torch.bfloat16)}
    steps = 200
    for step in range(1, steps + 1):
        model_ema.update(step)
        for name, tensor in plain_bf16.items():
            tensor.copy_(tensor * 0.9999 + getattr(module, name).detach() * (1 - 0.9999))
    # closed form in float64: ema = w - (w - ema_0) * decay**steps
    reference = {"weight": 2.0 - 1.0 * 0.9999**steps, "bias": -3.0 + 2.0 * 0.9999**steps}
    ema = model_ema.ema_state_dict()
    for name, value in reference.items():
        assert ema[name].dtype == torch.float32
        assert (ema[name].double() - value).abs().max().item() < 1e-5, name
        assert abs(value - (1.0 if name == "weight" else -1.0)) > 0.01  # the average really moved
    # plain bfloat16 arithmetic rounds each 1e-4 step away and never moves
    assert torch.equal(plain_bf16["weight"], torch.ones(8, 8, dtype=torch.bfloat16))
    assert torch.equal(plain_bf16["bias"], -torch.ones(8, dtype=torch.bfloat16))
    # the module still holds its bf16 weights
    assert module.weight.dtype == torch.bfloat16 and torch.all(module.weight == 2.0)


# ============================================================================================ non-finite weights


def _poison(module: Net, value: float = NAN) -> None:
    with torch.no_grad():
        module.fc.weight[1, 2] = value


@pytest.mark.parametrize("value", [NAN, float("inf"), -float("inf")])
def test_nonfinite_error_raises_and_leaves_ema_unchanged(value: float) -> None:
    module, model_ema = make(Net(), decay=0.9, nonfinite="error")
    randomize(module, 1)
    model_ema.update(1)
    before = clone_state(model_ema.ema_state_dict())
    randomize(module, 2)
    _poison(module, value)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteUpdateError, match=re.escape("fc.weight")) as info:
        model_ema.update(2)
    assert isinstance(info.value, FloatingPointError)
    assert "fc.bias" not in str(info.value)
    assert_equal_states(model_ema.ema_state_dict(), before)
    assert model_ema.num_updates == 1 and model_ema.last_update_step == 1


def test_nonfinite_error_names_every_bad_tensor() -> None:
    module, model_ema = make(decay=0.9)
    with torch.no_grad():
        module.fc.bias[0] = NAN
        module.bn.running_var[1] = float("inf")
    with pytest.raises(NonFiniteUpdateError) as info:
        model_ema.update(1)
    message = str(info.value)
    assert "fc.bias" in message and "bn.running_var" in message
    assert "fc.weight" not in message


def test_nonfinite_large_finite_values_are_averaged() -> None:
    module, model_ema = make(decay=0.5)
    with torch.no_grad():
        module.fc.weight.fill_(1e30)
    before = model_ema.ema_state_dict()["fc.weight"].double().clone()
    model_ema.update(1)
    expected = 0.5 * before + 0.5 * 1e30
    assert torch.allclose(model_ema.ema_state_dict()["fc.weight"].double(), expected, rtol=1e-6)


def test_nonfinite_skip_warns_keeps_ema_and_later_update_covers_skipped_steps() -> None:
    module, model_ema = make(decay=WarmupDecay(0.9, 2), nonfinite="skip")
    decay_at = warmup(0.9, 2)
    randomize(module, 1)
    assert model_ema.update(1) is not None
    after_first = clone_state(model_ema.ema_state_dict())
    for step in (2, 3):
        randomize(module, 10 + step)
        _poison(module)
        with pytest.warns(RuntimeWarning, match=re.escape("fc.weight")):
            assert model_ema.update(step) is None
        assert_equal_states(model_ema.ema_state_dict(), after_first)
        assert model_ema.num_updates == 1 and model_ema.last_update_step == 1
    randomize(module, 4)
    state = snapshot(module)
    assert model_ema.update(4) == pytest.approx(decay_at(4), rel=1e-15)
    assert model_ema.num_updates == 2 and model_ema.last_update_step == 4
    product = decay_at(2) * decay_at(3) * decay_at(4)
    expected = {n: product * after_first[n].double() + (1 - product) * state[n].double() for n in AVERAGED}
    expected.update({n: state[n] for n in INT_BUFFERS})
    assert_close(model_ema.ema_state_dict(), expected)


def test_nonfinite_ignore_averages_nan_in() -> None:
    module, model_ema = make(decay=0.9, nonfinite="ignore")
    _poison(module)
    assert model_ema.update(1) == 0.9
    ema = model_ema.ema_state_dict()["fc.weight"]
    assert torch.isnan(ema[1, 2])
    assert torch.isfinite(ema[0, 0])
    assert model_ema.num_updates == 1


def test_nonfinite_error_also_during_start_step_copies() -> None:
    module, model_ema = make(decay=0.9, start_step=5, nonfinite="error")
    before = clone_state(model_ema.ema_state_dict())
    _poison(module)
    with pytest.raises(NonFiniteUpdateError):
        model_ema.update(1)
    assert_equal_states(model_ema.ema_state_dict(), before)


def test_nonfinite_error_covers_copied_float_buffers() -> None:
    module, model_ema = make(decay=0.9, buffers="copy", nonfinite="error")
    with torch.no_grad():
        module.bn.running_var[0] = NAN
    with pytest.raises(NonFiniteUpdateError, match=re.escape("bn.running_var")):
        model_ema.update(1)
    assert torch.isfinite(model_ema.ema_state_dict()["bn.running_var"]).all()


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_update_with_zero_element_parameter(nonfinite: str) -> None:
    module = nn.Module()
    module.weight = nn.Parameter(torch.ones(3))
    module.empty = nn.Parameter(torch.ones(0, 4))
    model_ema = EMA(module, 0.5, nonfinite=nonfinite)  # type: ignore[arg-type]
    with torch.no_grad():
        module.weight.fill_(3.0)
    assert model_ema.update(1) == 0.5
    assert model_ema.ema_state_dict()["weight"].tolist() == [2.0, 2.0, 2.0]


def test_update_with_zero_element_parameter_and_nonfinite_ignore() -> None:
    module = nn.Module()
    module.weight = nn.Parameter(torch.ones(3))
    module.empty = nn.Parameter(torch.ones(0, 4))
    model_ema = EMA(module, 0.5, nonfinite="ignore")
    with torch.no_grad():
        module.weight.fill_(3.0)
    assert model_ema.update(1) == 0.5
    assert model_ema.ema_state_dict()["weight"].tolist() == [2.0, 2.0, 2.0]
    assert model_ema.ema_state_dict()["empty"].shape == (0, 4)


# ============================================================================================ swapping


def _trained(module: nn.Module | None = None, **kwargs: object) -> tuple[nn.Module, EMA]:
    kwargs.setdefault("decay", 0.7)
    module, model_ema = make(module, **kwargs)
    train(module, model_ema, [1, 2, 3])
    randomize(module, 999)  # raw weights differ from the EMA
    return module, model_ema


def test_swap_in_puts_ema_into_module_and_swap_out_restores_raw_bit_exactly() -> None:
    module, model_ema = _trained()
    raw = snapshot(module)
    ema = clone_state(model_ema.ema_state_dict())
    parameters = {name: p for name, p in module.named_parameters()}
    model_ema.swap_in()
    assert model_ema.is_swapped
    assert_equal_states(snapshot(module), ema)
    # the parameters are still the same objects and still trainable
    assert {name: p for name, p in module.named_parameters()} == parameters
    assert module.fc.weight.requires_grad and not module.frozen.requires_grad
    assert module.decoder.weight is module.head.weight
    model_ema.swap_out()
    assert not model_ema.is_swapped
    assert_equal_states(snapshot(module), raw)
    assert_equal_states(model_ema.ema_state_dict(), ema)


def test_swap_makes_no_copy_for_same_device_and_dtype() -> None:
    module, model_ema = _trained()
    ema_pointers = {name: t.data_ptr() for name, t in model_ema.ema_state_dict().items()}
    raw_pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}
    model_ema.swap_in()
    for name, tensor in module.state_dict().items():
        assert tensor.data_ptr() == ema_pointers[name], name
    model_ema.swap_out()
    for name, tensor in module.state_dict().items():
        assert tensor.data_ptr() == raw_pointers[name], name
    assert {name: t.data_ptr() for name, t in model_ema.ema_state_dict().items()} == ema_pointers


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_swap_with_half_weights_copies_and_restores_bit_exactly(half: torch.dtype) -> None:
    module, model_ema = _trained(Net(dtype=half))
    raw = snapshot(module)
    raw_pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}
    ema = clone_state(model_ema.ema_state_dict())
    with model_ema.swapped():
        swapped = module.state_dict()
        for name in AVERAGED:
            assert swapped[name].dtype == half
            assert torch.equal(swapped[name], ema[name].to(half)), name
        assert torch.equal(swapped["bn.num_batches_tracked"], ema["bn.num_batches_tracked"])
        # the module's storage is kept (the EMA is copied in)
        for name in AVERAGED:
            assert swapped[name].data_ptr() == raw_pointers[name]
        # the float32 EMA itself is not rounded by the swap
        assert_equal_states(model_ema.ema_state_dict(), ema)
    assert_equal_states(snapshot(module), raw)
    assert_equal_states(model_ema.ema_state_dict(), ema)


def test_nested_swaps_count_depth() -> None:
    module, model_ema = _trained()
    raw = snapshot(module)
    ema = clone_state(model_ema.ema_state_dict())
    model_ema.swap_in()
    model_ema.swap_in()
    assert_equal_states(snapshot(module), ema)
    model_ema.swap_out()
    assert model_ema.is_swapped
    assert_equal_states(snapshot(module), ema)
    model_ema.swap_out()
    assert not model_ema.is_swapped
    assert_equal_states(snapshot(module), raw)
    model_ema.swap_out()  # one too many is harmless
    assert_equal_states(snapshot(module), raw)


def test_swapped_context_restores_on_exception() -> None:
    module, model_ema = _trained(Net(dtype=torch.bfloat16))
    raw = snapshot(module)
    ema = clone_state(model_ema.ema_state_dict())
    with pytest.raises(KeyError), model_ema.swapped():
        swapped = module.state_dict()
        assert_equal_states({n: swapped[n] for n in AVERAGED}, {n: ema[n].to(torch.bfloat16) for n in AVERAGED})
        raise KeyError("boom")
    assert not model_ema.is_swapped
    assert_equal_states(snapshot(module), raw)


def test_swap_out_force() -> None:
    module, model_ema = _trained()
    raw = snapshot(module)
    for _ in range(3):
        model_ema.swap_in()
    model_ema.swap_out(force=True)
    assert not model_ema.is_swapped
    assert_equal_states(snapshot(module), raw)


def test_update_while_swapped_raises() -> None:
    _, model_ema = _trained()
    ema = clone_state(model_ema.ema_state_dict())
    with model_ema.swapped(), pytest.raises(RuntimeError):
        model_ema.update(4)
    assert model_ema.num_updates == 3 and model_ema.last_update_step == 3
    assert_equal_states(model_ema.ema_state_dict(), ema)
    assert model_ema.update(4) == 0.7


def test_state_reads_while_swapped() -> None:
    for module, model_ema in (_trained(), _trained(Net(dtype=torch.bfloat16))):
        raw = snapshot(module)
        ema = clone_state(model_ema.ema_state_dict())
        with model_ema.swapped():
            assert_equal_states(model_ema.ema_state_dict(), ema)
            assert_equal_states(model_ema.state_dict()["emas"][0], ema)
            assert_equal_states(model_ema.raw_state_dict(), raw)
        assert_equal_states(model_ema.raw_state_dict(), raw)
        assert_equal_states(model_ema.state_dict()["emas"][0], ema)


def test_state_dict_taken_while_swapped_saves_ema() -> None:
    _, model_ema = _trained()
    ema = clone_state(model_ema.ema_state_dict())
    with model_ema.swapped():
        buffer = io.BytesIO()
        torch.save(model_ema.state_dict(), buffer)
    buffer.seek(0)
    assert_equal_states(torch.load(buffer, weights_only=True)["emas"][0], ema)


def test_copy_and_load_refused_while_swapped() -> None:
    _, model_ema = _trained()
    state = model_ema.state_dict()
    ema = clone_state(model_ema.ema_state_dict())
    with model_ema.swapped():
        with pytest.raises(RuntimeError, match="swapped in"):
            model_ema.copy_to()
        with pytest.raises(RuntimeError, match="swapped in"):
            model_ema.copy_to(Net(seed=4))
        with pytest.raises(RuntimeError, match="swapped in"):
            model_ema.load_state_dict(state)
        assert model_ema.refresh() == []  # does nothing while swapped
    assert_equal_states(model_ema.ema_state_dict(), ema)


# ============================================================================================ state_dict


def _fresh_loaded(state: dict[str, object], **kwargs: object) -> tuple[nn.Module, EMA]:
    """A new module instance (other weights) whose new EMA loads ``state``."""
    module = Net(seed=42)
    model_ema = EMA(module, **kwargs)  # type: ignore[arg-type]
    model_ema.load_state_dict(state)
    return module, model_ema


def test_state_dict_round_trip() -> None:
    _, model_ema = _trained(decay=0.9, every_n_steps=1)
    state = model_ema.state_dict()
    assert set(state) == {"num_updates", "last_update_step", "step", "emas"}
    ema = clone_state(model_ema.ema_state_dict())
    module, loaded = _fresh_loaded(state, decay=0.9)
    assert_equal_states(loaded.ema_state_dict(), ema)
    assert loaded.num_updates == 3 and loaded.last_update_step == 3
    # the loaded EMA is its own copy and keeps the tie
    loaded_ema = loaded.ema_state_dict()
    assert loaded_ema["fc.weight"].data_ptr() != state["emas"][0]["fc.weight"].data_ptr()  # type: ignore[index]
    assert loaded_ema["head.weight"].data_ptr() == loaded_ema["decoder.weight"].data_ptr()
    # and updates continue from it
    randomize(module, 77)
    raw = snapshot(module)
    assert loaded.update(4) == 0.9
    expected = {n: 0.9 * ema[n].double() + 0.1 * raw[n].double() for n in AVERAGED}
    expected.update({n: raw[n] for n in INT_BUFFERS})
    assert_close(loaded.ema_state_dict(), expected)
    with loaded.swapped():  # and it is this module's EMA that a swap puts in
        assert_close({n: module.state_dict()[n] for n in AVERAGED}, {n: expected[n] for n in AVERAGED})
    assert_equal_states(snapshot(module), raw)


def test_state_dict_loads_into_a_module_whose_tensors_are_elsewhere() -> None:
    """The EMA tensors are copied into the new EMA's own storage; the tie is kept, the step counter too."""
    _, model_ema = _trained(decay=0.9)
    state = model_ema.state_dict()
    _, loaded = _fresh_loaded(state, decay=0.9)
    assert loaded.step == model_ema.step == 3
    with torch.no_grad():
        state["emas"][0]["fc.weight"].add_(1.0)  # type: ignore[index]
    assert not torch.equal(loaded.ema_state_dict()["fc.weight"], state["emas"][0]["fc.weight"])  # type: ignore[index]


def _mismatched_states(state: dict[str, object]) -> list[tuple[dict[str, object], list[str]]]:
    ema = dict(state["emas"][0])  # type: ignore[call-overload]
    wrong_shape = dict(ema, **{"fc.weight": torch.zeros(5, 4)})
    missing = {k: v for k, v in ema.items() if k != "fc.bias"}
    extra = dict(ema, **{"extra.weight": torch.zeros(1)})
    renamed = {("fc.other" if k == "fc.bias" else k): v for k, v in ema.items()}
    several = dict(wrong_shape, **{"bn.weight": torch.zeros(7)})
    return [
        ({**state, "emas": [wrong_shape]}, ["fc.weight", "(5, 4)", "(3, 4)"]),
        ({**state, "emas": [missing]}, ["fc.bias"]),
        ({**state, "emas": [extra]}, ["extra.weight"]),
        ({**state, "emas": [renamed]}, ["fc.bias", "fc.other"]),
        ({**state, "emas": [several]}, ["fc.weight", "bn.weight"]),
    ]


@pytest.mark.parametrize("case", range(5))
def test_load_mismatch_raises_listing_names_and_loads_nothing(case: int) -> None:
    source = _trained()[1]
    bad, offenders = _mismatched_states(source.state_dict())[case]
    bad = {**bad, "num_updates": 99, "last_update_step": 99, "step": 99}
    module, model_ema = _trained(Net(seed=3), decay=0.7)
    ema = clone_state(model_ema.ema_state_dict())
    with pytest.raises(EMAStateError, match="nothing was loaded") as info:
        model_ema.load_state_dict(bad)
    for name in offenders:
        assert name in str(info.value), name
    assert isinstance(info.value, ValueError)
    assert_equal_states(model_ema.ema_state_dict(), ema)
    assert model_ema.num_updates == 3 and model_ema.last_update_step == 3 and model_ema.step == 3
    # still works afterwards, on the same module
    randomize(module, 8)
    assert model_ema.update(4) == 0.7
    expected = {n: 0.7 * ema[n].double() + 0.3 * module.state_dict()[n].double() for n in AVERAGED}
    assert_close({n: model_ema.ema_state_dict()[n] for n in AVERAGED}, expected)


def test_state_of_compiled_module_loads_into_plain_module() -> None:
    wrapped = Wrapped(Net(seed=1), "_orig_mod")
    saved = EMA(wrapped, 0.9)
    train(wrapped, saved, [1, 2])
    state = saved.state_dict()
    assert all(name.startswith("_orig_mod.") for name in state["emas"][0])
    expected = {name.removeprefix("_orig_mod."): t.clone() for name, t in state["emas"][0].items()}
    _, loaded = _fresh_loaded(state, decay=0.9)
    assert_equal_states(loaded.ema_state_dict(), expected)
    assert loaded.num_updates == 2


def test_state_of_plain_module_loads_into_wrapped_module() -> None:
    _, plain = _trained(decay=0.9)
    expected = {"module." + name: t.clone() for name, t in plain.ema_state_dict().items()}
    model_ema = EMA(Wrapped(Net(seed=2), "module"), 0.9)
    model_ema.load_state_dict(plain.state_dict())
    assert_equal_states(model_ema.ema_state_dict(), expected)


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"num_updates": 1, "last_update_step": 1},
        {"num_updates": 1, "ema": {}},
        {"last_update_step": 1, "ema": {}},
        {"num_updates": 1, "last_update_step": 1, "ema": [torch.zeros(1)]},
        {"num_updates": -1, "last_update_step": 1, "emas": [{}]},
        {"num_updates": 1, "last_update_step": 1, "step": True, "emas": [{}]},
        [("num_updates", 1)],
    ],
)
def test_malformed_state_raises(state: object) -> None:
    _, model_ema = _trained()
    ema = clone_state(model_ema.ema_state_dict())
    with pytest.raises(EMAStateError):
        model_ema.load_state_dict(state)  # type: ignore[arg-type]
    assert_equal_states(model_ema.ema_state_dict(), ema)
    assert model_ema.num_updates == 3


def test_malformed_counter_raises_state_error_and_loads_nothing() -> None:
    _, model_ema = _trained()
    ema = clone_state(model_ema.ema_state_dict())
    bad = {"num_updates": "x", "last_update_step": 3, "ema": {n: torch.zeros_like(t) for n, t in ema.items()}}
    with pytest.raises(EMAStateError, match=r"`num_updates`.*'x'"):
        model_ema.load_state_dict(bad)
    assert_equal_states(model_ema.ema_state_dict(), ema)


def test_non_tensor_ema_values_raise_state_error() -> None:
    _, model_ema = _trained()
    bad = {
        "num_updates": 1,
        "last_update_step": 1,
        "ema": {n: t.tolist() for n, t in model_ema.ema_state_dict().items()},
    }
    with pytest.raises(EMAStateError, match=re.escape("fc.weight")):
        model_ema.load_state_dict(bad)


def test_state_dict_survives_torch_save_weights_only() -> None:
    _, model_ema = _trained(Net(dtype=torch.bfloat16))
    ema = clone_state(model_ema.ema_state_dict())
    buffer = io.BytesIO()
    torch.save(model_ema.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["num_updates"] == 3 and state["last_update_step"] == 3
    assert_equal_states(state["emas"][0], ema)
    loaded = EMA(Net(dtype=torch.bfloat16, seed=9), 0.7)
    loaded.load_state_dict(state)
    assert_equal_states(loaded.ema_state_dict(), ema)


# ============================================================================================ copy_to


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_to_module(dtype: torch.dtype) -> None:
    module, model_ema = _trained(Net(dtype=dtype))
    ema = clone_state(model_ema.ema_state_dict())
    pointers = {name: t.data_ptr() for name, t in module.state_dict().items()}
    model_ema.copy_to()
    state = module.state_dict()
    for name in ALL_NAMES:
        assert state[name].dtype == (torch.int64 if name in INT_BUFFERS else dtype)
        assert torch.equal(state[name], ema[name].to(state[name].dtype)), name
        assert state[name].data_ptr() == pointers[name]  # copied into the module's own storage
    # the EMA is unaffected and separate from the module
    assert_equal_states(model_ema.ema_state_dict(), ema)
    with torch.no_grad():
        module.fc.weight.add_(1.0)
    assert_equal_states(model_ema.ema_state_dict(), ema)


# ============================================================================================ validation


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("decay", 1.0),
        ("decay", -0.1),
        ("decay", "x"),
        ("decay", True),
        ("decay", float("nan")),
        ("every_n_steps", 0),
        ("every_n_steps", 1.5),
        ("every_n_steps", True),
        ("start_step", -1),
        ("start_step", 2.0),
        ("device", "nonsense-device"),
        ("device", 3.5),
        ("dtype", "int32"),
        ("dtype", torch.int64),
        ("dtype", "float7"),
        ("dtype", float),
        ("buffers", "avg"),
        ("buffers", None),
        ("include", ""),
        ("include", []),
        ("include", [3]),
        ("exclude", [None]),
        ("exclude", ["ok", ""]),
        ("nonfinite", "warn"),
    ],
)
def test_constructor_rejects_bad_arguments(argument: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        EMA(Net(), **{argument: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert f"`{argument}`" in message
    assert repr(value) in message


def test_constructor_rejects_what_is_not_a_module() -> None:
    with pytest.raises(ValueError, match=re.escape("`module` must be a torch.nn.Module, got dict")):
        EMA({"weight": torch.zeros(2)}, 0.9)  # type: ignore[arg-type]


def test_constructor_defaults_and_accepted_values() -> None:
    model_ema = EMA(Net())
    config = model_ema.config
    assert config.every_n_steps == 1 and config.start_step == 0
    assert config.device is None and config.dtype is None
    assert config.buffers == "average" and config.nonfinite == "error"
    assert config.include is None and config.exclude is None
    assert model_ema.schedule(1) == 0.9999 and model_ema.num_emas == 1
    assert model_ema.num_updates == 0 and model_ema.step == 0 and not model_ema.is_swapped
    model_ema = EMA(Net(), 0, include="fc.*", exclude=("bn.*", "frozen"), dtype="bfloat16", every_n_steps=2)
    config = model_ema.config
    assert config.include == ("fc.*",) and config.exclude == ("bn.*", "frozen")
    assert config.dtype == torch.bfloat16
    assert model_ema.schedule(5) == 0.0
