"""The three update paths of the engine, against each other and against plain float64 loops.

- ``"host"`` (CPU): the check reads every weight once, in blocks, and decides before anything is written; nothing
  is allocated per update.
- ``"device"`` (EMA on an accelerator): the check and the skip decision stay on the device and the host learns the
  outcome later. Without a GPU it runs on CPU tensors (forced) and on ``meta`` tensors, which have no values, so
  that any host read (``.item()``, ``bool()``) raises: the whole update path must run through without one.
- ``"deferred"`` (EMA offloaded to the CPU from accelerator weights): staged copies, applied when the EMA is next
  needed. Forced on CPU tensors.

The forced paths must give the host path's EMA bit for bit, the same counters, and report a refused or skipped
update with the step it happened at.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import lightning_ema._blocks as blocks_module
import lightning_ema._screen as screen_module
from lightning_ema import EMA, NonFiniteUpdateError
from lightning_ema._groups import forced_path
from lightning_ema.schedules import WarmupDecay

NAN = float("nan")


class Net(nn.Module):
    """Conv + BatchNorm (float buffers, an integer counter), a linear layer and a 0-d parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(36, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))
        perturb(self, 0)  # the same start in every instance


@torch.no_grad()
def perturb(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for tensor in module.state_dict(keep_vars=True).values():
        if tensor.is_floating_point():
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
        else:
            tensor.add_(1)


@torch.no_grad()
def poison(module: Net, where: str) -> None:
    if where == "first":
        module.conv.weight.view(-1)[0] = NAN
    elif where == "middle":
        module.bn.running_var[2] = float("inf")
    else:
        module.fc.weight.view(-1)[-1] = -float("inf")


POISONED = {"first": "conv.weight", "middle": "bn.running_var", "last": "fc.weight"}


def bits(state: dict[str, Tensor]) -> dict[str, list[int]]:
    """Raw bit patterns by name (tells -0.0 from 0.0, and NaN payloads apart)."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return {
        name: tensor.detach().contiguous().view(integer[tensor.element_size()]).flatten().tolist()
        for name, tensor in state.items()
    }


def twin(path: str | None, module: nn.Module, **kwargs: Any) -> EMA:
    with forced_path(path):
        return EMA(module, **kwargs)


# ============================================================================================ host path


@pytest.mark.parametrize("small_bytes", [0, 64, 1 << 30], ids=["one-by-one", "mixed", "all-packed"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_host_refused_update_leaves_every_bit(
    monkeypatch: pytest.MonkeyPatch, small_bytes: int, where: str, nonfinite: str
) -> None:
    """Small tensors are screened together, concatenated; either way only the bad tensor is named."""
    monkeypatch.setattr(screen_module, "SMALL_BYTES", small_bytes)
    module = Net()
    model_ema = EMA(module, decay=0.9, nonfinite=nonfinite)  # type: ignore[arg-type]
    assert model_ema._storage.path == "host"
    screens = [group.screen for group in model_ema._storage.groups if group.screen is not None]
    packed = [i for screen in screens for i in screen.small]
    alone = [i for screen in screens for i in screen.alone]
    assert bool(packed) == (small_bytes > 0) and bool(alone) == (small_bytes < 1000)
    perturb(module, 1)
    model_ema.update(1)
    before = bits(model_ema.ema_state_dict())
    perturb(module, 2)
    poison(module, where)  # type: ignore[arg-type]
    if nonfinite == "error":
        with pytest.raises(NonFiniteUpdateError, match=rf"\['{re.escape(POISONED[where])}'\].*step 2"):
            model_ema.update(2)
    else:
        with pytest.warns(RuntimeWarning, match=rf"\['{re.escape(POISONED[where])}'\].*step 2"):
            assert model_ema.update(2) is None
    assert bits(model_ema.ema_state_dict()) == before
    assert (model_ema.num_updates, model_ema.last_update_step) == (1, 1)


def test_host_update_equals_a_float64_loop_with_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocks_module, "BLOCK_BYTES", 40)
    module = Net()
    ema = {n: t.double().clone() for n, t in module.state_dict().items() if t.is_floating_point()}
    model_ema = EMA(module, decay=0.8)
    for step in range(1, 6):
        perturb(module, step)
        model_ema.update(step)
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                ema[name] = 0.8 * ema[name] + 0.2 * tensor.double()
    for name, value in ema.items():
        assert torch.allclose(model_ema.ema_state_dict()[name].double(), value, atol=1e-6), name


def _allocations(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    return sum(1 for event in events if event.name() == "[memory]" and event.nbytes() > 0)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"decay": [0.9, 0.99]}, {"nonfinite": "skip"}, {"nonfinite": "ignore"}, {"dtype": torch.float64}],
    ids=["default", "two-decays", "skip", "ignore", "float64-ema"],
)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16, torch.float16])
def test_host_update_allocates_no_tensor(kwargs: dict[str, Any], weights: torch.dtype) -> None:
    module = Net().to(weights)
    model_ema = EMA(module, **kwargs)
    model_ema.update(1)
    assert _allocations(lambda: model_ema.update(2)) == 0
    assert _allocations(lambda: torch.zeros(3)) == 1  # the counter counts


# ============================================================================================ trajectories


def _run(
    model_ema: EMA, module: Net, steps: int, poisoned: dict[int, str], reads: bool
) -> tuple[list[tuple[str, Any]], dict[str, list[int]]]:
    """Drive ``model_ema`` through ``steps`` updates; record what each call raised or warned, and the final EMA."""
    events: list[tuple[str, Any]] = []

    def call(label: str, fn: Callable[[], object]) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = fn()
            except NonFiniteUpdateError as error:
                events.append((label, ("error", _step_of(str(error)))))
                return
        for warning in caught:
            events.append((label, ("warning", _step_of(str(warning.message)))))
        if label.startswith("update") and result is not None:
            events.append((label, ("decay", round(float(result), 12))))  # type: ignore[arg-type]

    for step in range(1, steps + 1):
        perturb(module, step)
        if step in poisoned:
            poison(module, poisoned[step])
        call(f"update {step}", lambda s=step: model_ema.update(s))
        if reads:
            call(f"read {step}", lambda: model_ema.ema_state_dict())
            events.append((f"counters {step}", (model_ema.num_updates, model_ema.last_update_step)))
    call("final read", lambda: model_ema.ema_state_dict())
    events.append(("counters", (model_ema.num_updates, model_ema.last_update_step, model_ema.last_decays)))
    return events, bits({k: v.clone() for k, v in model_ema.ema_state_dict().items()})


def _warned(events: list[tuple[str, Any]]) -> list[int]:
    return [value[1] for _, value in events if value[0] == "warning"]


def _step_of(message: str) -> int:
    match = re.search(r"at optimizer step (\d+)", message)
    assert match, message
    return int(match.group(1))


CONFIGS = [
    {"decay": 0.9},
    {"decay": WarmupDecay(0.99, 3)},  # weights above 0.5 at first: the where-gated kernel
    {"decay": [0.9, 0.99], "every_n_steps": 2},
    {"decay": 0.9, "start_step": 3},  # gated copies
    {"decay": 0.9, "buffers": "copy"},
    {"decay": 0.9, "buffer_decay": 0.5, "integer_buffers": "average"},  # buffer weights; truncated integer EMA
    {"decay": 0.9, "integer_buffers": "keep"},
]
IDS = ["constant", "warmup", "two-decays-every-2", "start-step", "copy", "buffer-decay-int-average", "int-keep"]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("path", ["device", "deferred"])
def test_forced_path_gives_the_host_path_ema_bit_for_bit_with_skips(config: dict[str, Any], path: str) -> None:
    poisoned = {4: "middle", 5: "first", 8: "last"}
    results = {}
    for which in ("host", path):
        module = Net()
        model_ema = twin(which, module, nonfinite="skip", **config)
        assert model_ema._storage.path == which
        results[which] = _run(model_ema, module, 10, poisoned, reads=True)
    (host_events, host_bits), (events, forced_bits) = results["host"], results[path]
    assert forced_bits == host_bits
    # Counters agree once the outcome is known (after every read), and every skip is reported with its step.
    assert [e for e in events if e[0].startswith("counters")] == [e for e in host_events if e[0].startswith("counters")]
    assert _warned(events) == _warned(host_events)
    assert _warned(host_events) and set(_warned(host_events)) <= set(poisoned)


@pytest.mark.parametrize("path", ["device", "deferred"])
def test_forced_path_reports_a_skip_at_the_next_update_when_nothing_reads_in_between(path: str) -> None:
    results = {}
    for which in ("host", path):
        module = Net()
        results[which] = _run(twin(which, module, decay=0.9, nonfinite="skip"), module, 6, {3: "last"}, reads=False)
    host_events, _ = results["host"]
    events, forced_bits = results[path]
    assert forced_bits == results["host"][1]
    assert ("update 3", ("warning", 3)) in host_events
    assert ("update 4", ("warning", 3)) in events  # reported one update later, for step 3
    assert events[-1] == host_events[-1]  # counters and decays, once known


@pytest.mark.parametrize("path", ["device", "deferred"])
@pytest.mark.parametrize("reader", ["update", "ema_state_dict", "state_dict", "swapped", "copy_to"])
def test_forced_path_refusal_is_raised_at_the_next_read_and_the_ema_keeps_its_last_finite_value(
    path: str, reader: str
) -> None:
    module = Net()
    reference_module = Net()
    reference = EMA(reference_module, decay=0.9)
    model_ema = twin(path, module, decay=0.9)
    for step in (1, 2):
        perturb(module, step)
        perturb(reference_module, step)
        model_ema.update(step)
        reference.update(step)
    perturb(module, 3)
    perturb(reference_module, 3)
    poison(module, "middle")
    assert model_ema.update(3) == 0.9  # the host does not know yet
    readers: dict[str, Callable[[], object]] = {
        "update": lambda: model_ema.update(4),
        "ema_state_dict": model_ema.ema_state_dict,
        "state_dict": model_ema.state_dict,
        "swapped": lambda: model_ema.swapped().__enter__(),
        "copy_to": lambda: model_ema.copy_to(Net()),
    }
    with pytest.raises(NonFiniteUpdateError, match=r"\['bn.running_var'\] hold NaN or infinity at optimizer step 3"):
        readers[reader]()
    assert not model_ema.is_swapped
    assert bits(model_ema.ema_state_dict()) == bits(reference.ema_state_dict())
    assert (model_ema.num_updates, model_ema.last_update_step) == (2, 2)
    # Reported once; the next update covers the steps since the last applied one, as on the host.
    perturb(module, 4)
    perturb(reference_module, 4)
    assert model_ema.update(4) == reference.update(4)
    assert bits(model_ema.ema_state_dict()) == bits(reference.ema_state_dict())


def test_forced_device_path_with_a_target_module() -> None:
    """A mean teacher's EMA lives in the teacher's own tensors; the gated kernels write there."""
    results = []
    for which in ("host", "device"):
        student, teacher = Net(), Net()
        teacher.load_state_dict(student.state_dict())
        model_ema = twin(which, student, decay=0.7, nonfinite="skip", target=teacher)
        _run(model_ema, student, 5, {2: "first"}, reads=False)
        results.append(bits(teacher.state_dict()))
    assert results[0] == results[1]


def test_deferred_path_applies_the_update_when_the_ema_is_needed() -> None:
    module = Net()
    model_ema = twin("deferred", module, decay=0.5)
    g, i = model_ema._storage.where["conv.weight"]
    storage_ema = model_ema._storage.groups[g].emas[0][i]  # the storage itself, not through a read
    before = storage_ema.clone()
    perturb(module, 1)
    model_ema.update(1)
    assert torch.equal(storage_ema, before)  # staged, not yet applied
    expected = 0.5 * before.double() + 0.5 * module.conv.weight.double()
    assert torch.allclose(model_ema.ema_state_dict()["conv.weight"].double(), expected, atol=1e-6)


# ============================================================================================ no host reads


@contextmanager
def _no_host_reads() -> Iterator[None]:
    """Make every way of reading a tensor's value on the host raise."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the update read a tensor value on the host")

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forced_device_path_issues_an_update_without_reading_on_the_host(config: dict[str, Any]) -> None:
    module = Net()
    model_ema = twin("device", module, **config)
    for step in range(1, 5):
        perturb(module, step)
        poison(module, "first") if step == 2 else None
        with _no_host_reads():
            model_ema._storage.side.wait()
            pending = model_ema._pending
            model_ema._pending = None  # what the host reads of an earlier update is checked below
            model_ema.update(step)
        if pending is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pending.check.bad()  # type: ignore[union-attr]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("nonfinite", ["error", "skip", "ignore"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_tensors_take_the_device_path_with_no_host_read(
    config: dict[str, Any], nonfinite: str, dtype: torch.dtype
) -> None:
    """Meta tensors hold no values: ``.item()`` and ``bool()`` raise, so a run proves the path never reads."""
    module = Net().to(device="meta", dtype=dtype)
    model_ema = EMA(module, nonfinite=nonfinite, **config)  # type: ignore[arg-type]
    assert model_ema._storage.path == "device"
    for step in range(1, 7):
        model_ema.update(step)
    with model_ema.swapped():
        pass
    model_ema.ema_state_dict()
    model_ema.state_dict()
    model_ema.relative_distances()
    model_ema.copy_to()
    assert model_ema.num_updates == 6 // config.get("every_n_steps", 1)


def test_the_host_path_on_meta_tensors_raises_so_the_meta_test_can_fail() -> None:
    module = Net().to("meta")
    model_ema = twin("host", module, decay=0.9)
    with pytest.raises(RuntimeError, match="meta"):
        model_ema.update(1)


def test_side_stream_is_a_no_op_without_cuda() -> None:
    module = Net()
    model_ema = EMA(module, decay=0.9)
    model_ema.use_side_stream()
    assert model_ema._storage.side.stream is None
    perturb(module, 1)
    model_ema.update(1)
    assert model_ema.num_updates == 1


def test_forced_path_rejects_unknown_paths() -> None:
    with pytest.raises(ValueError, match="`path` must be one of"), forced_path("gpu"):
        pass
