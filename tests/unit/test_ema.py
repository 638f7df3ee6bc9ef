"""The public ``EMA`` as a plain training loop uses it, each result against a float64 loop written out here.

Step counting (``update()`` vs ``update(step)``), swaps and their restore, ``copy_to`` into the module and into a
twin, a ``state_dict`` round trip through a file that continues bit for bit, ``refresh`` after tensors were
replaced, inference mode, lazy modules, the ``target`` mode and the ``ema_exclude`` protocol.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_ema import EMA, EMAStateError
from lightning_ema.ema import EMAConfig
from lightning_ema.schedules import WarmupDecay


class Net(nn.Module):
    """Linear -> BatchNorm1d -> Linear, with fixed initial weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.bn(self.fc(x)))


FLOATS = ["fc.weight", "fc.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "out.weight", "out.bias"]


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-6) -> None:
    for name, tensor in expected.items():
        error = (actual[name].double() - tensor.double()).abs().max().item()
        assert error <= atol, f"{name}: max error {error}"


def sgd_step(module: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """One real training step on a fixed random batch (BatchNorm statistics move too)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(module.parameters()).dtype
    x = torch.randn(8, 4, generator=generator).to(dtype)
    y = torch.randn(8, 2, generator=generator).to(dtype)
    optimizer.zero_grad()
    nn.functional.mse_loss(module(x), y).backward()
    optimizer.step()


def float64_ema(
    initial: dict[str, Tensor],
    states: list[dict[str, Tensor]],
    decay_at: Callable[[int], float],
    *,
    every_n_steps: int = 1,
    start_step: int = 0,
) -> dict[str, Tensor]:
    """The EMA after optimizer steps 1..len(states), ``states[t - 1]`` being the weights after step t."""
    ema = {name: initial[name].double() for name in FLOATS}
    last = 0
    for step, state in enumerate(states, start=1):
        if step % every_n_steps:
            continue
        if step <= start_step:
            ema = {name: state[name].double() for name in FLOATS}
        else:
            decay = math.prod(decay_at(s) for s in range(max(last, start_step) + 1, step + 1))
            ema = {name: decay * ema[name] + (1 - decay) * state[name].double() for name in FLOATS}
        last = step
    return ema


def warmup(decay: float, steps: int) -> Callable[[int], float]:
    return lambda t: min(decay, (1 + t) / (steps + t))


# ============================================================================================ a training loop


@pytest.mark.parametrize(("every_n_steps", "start_step"), [(1, 0), (3, 0), (2, 3)])
def test_training_loop_ema_equals_the_float64_loop(every_n_steps: int, start_step: int) -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, WarmupDecay(0.9, 5), every_n_steps=every_n_steps, start_step=start_step)
    initial, states = snapshot(model), []
    for step in range(1, 13):
        sgd_step(model, optimizer, step)
        states.append(snapshot(model))
        ema.update(step)
    assert ema.num_updates == 12 // every_n_steps and ema.step == 12
    expected = float64_ema(initial, states, warmup(0.9, 5), every_n_steps=every_n_steps, start_step=start_step)
    assert_close(ema.ema_state_dict(), expected)
    # the integer BatchNorm counter is copied at each update
    last_update = 12 - 12 % every_n_steps
    assert ema.ema_state_dict()["bn.num_batches_tracked"].item() == last_update


def test_update_without_step_counts_calls_like_explicit_steps() -> None:
    counted, explicit = Net(), Net()
    emas = [EMA(m, WarmupDecay(0.9, 4), every_n_steps=3, start_step=2) for m in (counted, explicit)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (counted, explicit)]
    for step in range(1, 11):
        for model, optimizer in zip((counted, explicit), optimizers, strict=True):
            sgd_step(model, optimizer, step)
        returned = emas[0].update(), emas[1].update(step)
        assert returned[0] == returned[1]
        assert (returned[0] is None) == (step % 3 != 0), step
    assert emas[0].step == emas[1].step == 10 and emas[0].num_updates == emas[1].num_updates == 3
    assert_equal(emas[0].ema_state_dict(), emas[1].ema_state_dict())
    # after an explicit step, counting goes on from it: 14 covers the due step 12, 15 is due again
    assert emas[0].update(14) is not None
    assert emas[0].step == emas[0].last_update_step == 14 and emas[0].num_updates == 4
    assert emas[0].update() is not None
    assert emas[0].step == emas[0].last_update_step == 15 and emas[0].num_updates == 5
    assert emas[0].update() is None and emas[0].step == 16


def test_explicit_steps_that_jump_multiply_the_decays_of_every_step() -> None:
    model = Net()
    ema = EMA(model, 0.8)
    before = {name: t.double() for name, t in snapshot(model).items() if name in FLOATS}
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 0)
    assert ema.update(5) == 0.8  # steps 1..5 done since the EMA began, one update
    weights = snapshot(model)
    expected = {n: 0.8**5 * before[n] + (1 - 0.8**5) * weights[n].double() for n in FLOATS}
    assert_close(ema.ema_state_dict(), expected, atol=1e-7)


@pytest.mark.parametrize("step", [2, -1, 1.5, True, "3", None])
def test_a_step_going_backwards_or_not_an_integer_raises(step: object) -> None:
    model = Net()
    ema = EMA(model, 0.5)
    ema.update(3)
    before = {name: t.clone() for name, t in ema.ema_state_dict().items()}
    if step is None:  # counting calls never goes backwards
        assert ema.update() == 0.5 and ema.step == 4
        return
    with pytest.raises(
        ValueError, match=rf"`step` must be an integer >= the last step seen \(3\), got {re.escape(repr(step))}"
    ):
        ema.update(step)  # type: ignore[arg-type]
    assert ema.step == 3 and ema.num_updates == 1
    assert_equal(ema.ema_state_dict(), before)
    assert ema.update(3) is None  # the same step again: nothing is due


def test_from_config_starts_at_the_given_step() -> None:
    model = Net()
    ema = EMA.from_config(model, EMAConfig.create(0.5, every_n_steps=2), step=4)
    assert ema.step == ema.last_update_step == 4 and ema.num_updates == 0
    assert ema.update(5) is None
    assert ema.update(6) == 0.5  # covers steps 5 and 6: decay 0.25 applied
    with pytest.raises(ValueError, match="got 3"):
        ema.update(3)


# ============================================================================================ swaps


def test_swapped_yields_the_module_with_the_ema_and_restores_bit_exactly() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.7)
    for step in range(1, 4):
        sgd_step(model, optimizer, step)
        ema.update()
    raw, averaged = snapshot(model), {n: t.clone() for n, t in ema.ema_state_dict().items()}
    with ema.swapped() as inside:
        assert inside is model and ema.is_swapped
        assert_equal(snapshot(model), averaged)
        assert_equal(ema.raw_state_dict(), raw)
    assert not ema.is_swapped
    assert_equal(snapshot(model), raw)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_restores_the_raw_weights_on_an_exception(error: type[BaseException], dtype: torch.dtype) -> None:
    model = Net().to(dtype)  # bfloat16: a float32 EMA, so the swap copies instead of exchanging storage
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.7)
    for step in range(1, 4):
        sgd_step(model, optimizer, step)
        ema.update()
    raw = snapshot(model)
    with pytest.raises(error), ema.swapped():
        assert not torch.equal(model.fc.weight, raw["fc.weight"])
        raise error("boom")
    assert not ema.is_swapped
    assert_equal(snapshot(model), raw)
    # and training and averaging go on normally
    sgd_step(model, optimizer, 4)
    assert ema.update() == 0.7


def test_swapped_model_trains_nothing_into_the_raw_weights() -> None:
    """Autograd through the swapped-in EMA works and the raw weights come back untouched by it."""
    model = Net()
    ema = EMA(model, 0.5)
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1)
    ema.update()
    raw = snapshot(model)
    with ema.swapped():
        model(torch.ones(2, 4)).sum().backward()
    assert model.fc.weight.grad is not None
    assert_equal(snapshot(model), raw)


# ============================================================================================ copy_to


def trained(seed: int = 0, decay: object = 0.7) -> tuple[Net, EMA]:
    model = Net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay)  # type: ignore[arg-type]
    for step in range(1, 4):
        sgd_step(model, optimizer, step)
        ema.update()
    return model, ema


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_copy_to_another_module_matches_canonical_names() -> None:
    _, ema = trained()
    twin = torch.compile(Net(seed=5))  # names under `_orig_mod.`; compiling is lazy, nothing runs
    assert all(name.startswith("_orig_mod.") for name in twin.state_dict())
    ema.copy_to(twin)
    copied = {name.removeprefix("_orig_mod."): t for name, t in twin.state_dict().items()}
    assert_equal(copied, ema.ema_state_dict())
    # a copy, not shared storage
    assert copied["fc.weight"].data_ptr() != ema.ema_state_dict()["fc.weight"].data_ptr()


def test_copy_to_leaves_untracked_tensors_of_the_other_module_alone() -> None:
    model = Net()
    ema = EMA(model, 0.5, include="fc.*")
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1)
    ema.update()
    other = Net(seed=3)
    before = snapshot(other)
    ema.copy_to(other)
    after = snapshot(other)
    assert torch.equal(after["fc.weight"], ema.ema_state_dict()["fc.weight"])
    for name in before:
        if not name.startswith("fc."):
            assert torch.equal(after[name], before[name]), name


def test_copy_to_a_mismatched_module_raises_naming_the_tensors_and_copies_nothing() -> None:
    _, ema = trained()

    class Other(Net):
        def __init__(self) -> None:
            super().__init__(seed=9)
            self.out = nn.Linear(3, 5)  # other shape
            del self.bn  # missing names

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.fc(x))

    other = Other()
    before = snapshot(other)
    with pytest.raises(EMAStateError, match="nothing was copied") as info:
        ema.copy_to(other)
    for name in ("out.weight", "out.bias", "bn.weight", "bn.running_mean"):
        assert name in str(info.value), name
    assert "fc.weight" not in str(info.value)
    assert_equal(snapshot(other), before)  # fc.* would have fitted, but nothing is half-copied


def test_copy_to_the_module_overwrites_the_raw_weights_with_an_ema_by_index() -> None:
    model, ema = trained(decay=[0.5, 0.9])
    second = {n: t.clone() for n, t in ema.ema_state_dict(1).items()}
    assert not torch.equal(second["fc.weight"], ema.ema_state_dict(0)["fc.weight"])
    ema.copy_to(index=1)
    assert_equal(snapshot(model), second)
    with pytest.raises(ValueError, match=r"`index` must be an integer in \[0, 2\), got 2"):
        ema.copy_to(index=2)


# ============================================================================================ state_dict and resume


def run(steps: range, model: Net, optimizer: torch.optim.Optimizer, ema: EMA) -> None:
    for step in steps:
        sgd_step(model, optimizer, step)
        ema.update()  # counting calls: the resumed EMA must know which step it is at


@pytest.mark.parametrize("decay", [WarmupDecay(0.9, 4), [0.6, WarmupDecay(0.95, 3)]])
def test_state_dict_through_a_file_resumes_bit_for_bit(tmp_path: Path, decay: object) -> None:
    options = {"every_n_steps": 3, "start_step": 2}

    def fresh() -> tuple[Net, torch.optim.Optimizer, EMA]:
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, EMA(model, decay, **options)  # type: ignore[arg-type]

    model, optimizer, whole = fresh()
    run(range(1, 15), model, optimizer, whole)

    model, optimizer, first = fresh()
    run(range(1, 8), model, optimizer, first)
    path = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": first.state_dict()}, path)
    del model, optimizer, first

    checkpoint = torch.load(path, weights_only=True)
    model, optimizer, resumed = fresh()  # a new process would start exactly like this
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["ema"])
    assert resumed.step == 7 and resumed.last_update_step == 6 and resumed.num_updates == 2
    run(range(8, 15), model, optimizer, resumed)

    assert resumed.num_updates == whole.num_updates == 4 and resumed.step == whole.step == 14
    for index in range(whole.num_emas):
        assert_equal(resumed.ema_state_dict(index), whole.ema_state_dict(index))


def test_state_dict_holds_plain_values_and_detached_tensors() -> None:
    _, ema = trained()
    state = ema.state_dict()
    assert {key: state[key] for key in ("num_updates", "last_update_step", "step")} == {
        "num_updates": 3,
        "last_update_step": 3,
        "step": 3,
    }
    assert all(not t.requires_grad for t in state["emas"][0].values())


# ============================================================================================ refresh


def test_refresh_after_module_to_float64_rebinds_and_keeps_the_averages() -> None:
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, 0.5)
    run(range(1, 3), model, optimizer, ema)
    averages = {n: t.clone() for n, t in ema.ema_state_dict().items()}
    assert ema.refresh() == []  # nothing changed: nothing to do
    model.to(torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    changed = ema.refresh()
    assert sorted(changed) == sorted(FLOATS)  # the integer counter was not replaced
    rebound = ema.ema_state_dict()
    for name in FLOATS:
        assert rebound[name].dtype == torch.float64, name
        assert torch.equal(rebound[name], averages[name].double()), name
    sgd_step(model, optimizer, 3)
    weights = snapshot(model)
    ema.update()
    expected = {n: 0.5 * averages[n].double() + 0.5 * weights[n] for n in FLOATS}
    assert_close(ema.ema_state_dict(), expected, atol=1e-15)  # float64 all the way now
    with ema.swapped():
        assert_equal({n: model.state_dict()[n] for n in FLOATS}, {n: ema.ema_state_dict()[n] for n in FLOATS})
    assert_equal(snapshot(model), weights)


def test_refresh_after_a_buffer_assigned_out_of_place_follows_the_new_tensor() -> None:
    model = Net()
    ema = EMA(model, 0.5)
    before = ema.ema_state_dict()["bn.running_mean"].clone()
    model.bn.running_mean = torch.full((3,), 4.0)  # a new tensor: the EMA still points at the old one
    assert ema.refresh() == ["bn.running_mean"]
    ema.update()
    assert torch.equal(ema.ema_state_dict()["bn.running_mean"], 0.5 * before + 0.5 * torch.full((3,), 4.0))
    with ema.swapped():
        assert torch.equal(model.bn.running_mean, 0.5 * before + 2.0)
    assert torch.equal(model.bn.running_mean, torch.full((3,), 4.0))


def test_refresh_after_a_shape_change_raises_naming_the_tensor_and_keeps_the_ema() -> None:
    model = Net()
    ema = EMA(model, 0.5)
    averages = {n: t.clone() for n, t in ema.ema_state_dict().items()}
    model.out.weight = nn.Parameter(torch.zeros(2, 5))
    with pytest.raises(EMAStateError, match=re.escape("out.weight")) as info:
        ema.refresh()
    assert "(2, 3)" in str(info.value) and "(2, 5)" in str(info.value)
    assert_equal(ema.ema_state_dict(), averages)


# ============================================================================================ inference mode, lazy


def test_ema_created_under_inference_mode_is_updatable_and_usable_by_autograd() -> None:
    model = Net()
    with torch.inference_mode():  # e.g. a validation before training made the EMA
        ema = EMA(model, 0.5)
    assert not any(t.is_inference() for t in ema.ema_state_dict().values())
    start = {n: t.clone() for n, t in ema.ema_state_dict().items()}
    sgd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), 1)
    assert ema.update() == 0.5
    expected = {n: 0.5 * start[n].double() + 0.5 * model.state_dict()[n].double() for n in FLOATS}
    assert_close(ema.ema_state_dict(), expected, atol=1e-7)
    with ema.swapped():
        loss = model(torch.ones(4, 4)).sum()
        loss.backward()  # the swapped-in tensors are ordinary ones
    assert model.fc.weight.grad is not None


@pytest.mark.parametrize("lazy", [lambda: nn.LazyLinear(3), lambda: nn.LazyBatchNorm1d(affine=False)])
def test_lazy_modules_are_refused_before_materialisation(lazy: Callable[[], nn.Module]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), lazy())
    with pytest.raises(EMAStateError, match=r"uninitialized \(lazy\).*run one forward pass"):
        EMA(model, 0.9)
    model(torch.randn(2, 4))  # materialised
    ema = EMA(model, 0.9)
    assert "1.running_mean" in ema.ema_state_dict() or "1.weight" in ema.ema_state_dict()


# ============================================================================================ target and ema_exclude


def test_target_holds_the_ema_in_another_modules_tensors() -> None:
    student = Net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.fc.weight.fill_(1.0)  # the target's current values are the EMA's start
    start = {n: t.double() for n, t in snapshot(teacher).items()}
    ema = EMA(student, 0.6, target=teacher)
    pointers = {n: t.data_ptr() for n, t in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    states = []
    for step in range(1, 5):
        sgd_step(student, optimizer, step)
        states.append(snapshot(student))
        ema.update()
    expected = float64_ema(start, states, lambda t: 0.6)
    assert_close(snapshot(teacher), expected)
    assert {n: t.data_ptr() for n, t in teacher.state_dict().items()} == pointers  # updated in place
    assert_equal(ema.ema_state_dict(), snapshot(teacher))
    # a swap puts the teacher's values into the student and both come back as they were
    raw, averaged = snapshot(student), snapshot(teacher)
    with ema.swapped():
        assert_equal(snapshot(student), averaged)
    assert_equal(snapshot(student), raw)
    assert_equal(snapshot(teacher), averaged)
    sgd_step(student, optimizer, 5)
    ema.update()
    assert {n: t.data_ptr() for n, t in teacher.state_dict().items()} == pointers


def test_target_state_dict_round_trip_writes_into_the_target() -> None:
    student, teacher = Net(), Net(seed=1)
    ema = EMA(student, 0.6, target=teacher)
    sgd_step(student, torch.optim.SGD(student.parameters(), lr=0.1), 1)
    ema.update()
    state = {"num_updates": 1, "last_update_step": 1, "emas": [{n: t.clone() for n, t in ema.ema_state_dict().items()}]}
    other_student, other_teacher = Net(seed=2), Net(seed=3)
    loaded = EMA(other_student, 0.6, target=other_teacher)
    loaded.load_state_dict(state)
    assert_equal(snapshot(other_teacher), state["emas"][0])
    assert loaded.num_updates == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"target": "self"}, {"device": "cpu"}, {"dtype": torch.float64}, {"decay": [0.5, 0.9]}],
)
def test_target_refuses_what_it_cannot_hold(kwargs: dict[str, object]) -> None:
    student = Net()
    options = {"decay": 0.5, "target": Net(seed=1), **kwargs}
    if options["target"] == "self":
        options["target"] = student
    with pytest.raises(ValueError, match="`target` must be a module other than the tracked one"):
        EMA(student, **options)  # type: ignore[arg-type]


def test_target_lacking_a_tracked_tensor_raises_naming_it() -> None:
    teacher = Net(seed=1)
    del teacher.bn
    with pytest.raises(EMAStateError, match=re.escape("bn.weight")):
        EMA(Net(), 0.5, target=teacher)


def test_a_module_declares_tensors_that_are_averages_already_through_ema_exclude() -> None:
    class WithTeacher(nn.Module):
        ema_exclude = ("teacher.*",)

        def __init__(self) -> None:
            super().__init__()
            self.student = Net()
            self.teacher = Net(seed=1)

    ema = EMA(WithTeacher(), 0.9, exclude="student.bn.*")
    assert sorted(ema.ema_state_dict()) == [
        "student.fc.bias",
        "student.fc.weight",
        "student.out.bias",
        "student.out.weight",
    ]


def test_a_sharded_state_is_refused_on_another_rank() -> None:
    """A state recording rank 1's local shards cannot load here (one process: rank 0 of 1)."""
    module = torch.nn.Linear(2, 2)
    ema = EMA(module, 0.9)
    state = ema.state_dict()
    state["shard"] = {"rank": 1, "world_size": 2}
    before = {k: v.clone() for k, v in ema.ema_state_dict().items()}
    with pytest.raises(EMAStateError, match=r"rank 1 of 2, but this is rank 0 of 1"):
        ema.load_state_dict(state)
    for name, tensor in before.items():
        assert torch.equal(ema.ema_state_dict()[name], tensor)
