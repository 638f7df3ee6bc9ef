"""Tests of lightning_ema.schedules, checked against closed forms recomputed here with math."""

from __future__ import annotations

import itertools
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lightning_ema.schedules as schedules_module
from lightning_ema.schedules import (
    ConstantDecay,
    CosineDecay,
    DecaySchedule,
    ExponentialRampDecay,
    HalfLifeDecay,
    KarrasDecay,
    MomentumWarmupDecay,
    PowerDecay,
    WarmupDecay,
    as_schedule,
    normalize_repr,
)

NAN = float("nan")
INF = float("inf")

STEPS = (1, 2, 3, 10, 99, 100, 101, 1_000, 12_345, 10**6, 10**9)

# One or more instances of every schedule, including edge parameters.
SCHEDULES: list[DecaySchedule] = [
    ConstantDecay(decay=0.999),
    ConstantDecay(decay=0.0),
    HalfLifeDecay(half_life=1000),
    HalfLifeDecay(half_life=0.25),
    WarmupDecay(decay=0.999),
    WarmupDecay(decay=0.9, warmup=10),
    WarmupDecay(decay=0.99, warmup=100),
    WarmupDecay(decay=0.9, warmup=1),
    PowerDecay(),
    PowerDecay(decay=0.99, inv_gamma=1.0, power=1.0),
    PowerDecay(decay=0.999, inv_gamma=10.0, power=0.75, min_decay=0.5),
    ExponentialRampDecay(),
    ExponentialRampDecay(decay=0.99, gamma=20),
    MomentumWarmupDecay(),
    MomentumWarmupDecay(momentum=0.5, warmup=10),
    MomentumWarmupDecay(momentum=0.2, warmup=0.5),
    CosineDecay(start=0.996, end=0.9999, total_steps=1000),
    CosineDecay(start=0.99, end=0.9, total_steps=50),
    CosineDecay(start=0.5, end=0.9, total_steps=1),
    CosineDecay(start=0.996, end=1.0, total_steps=100),
    KarrasDecay(gamma=6.94),
    KarrasDecay(gamma=0),
    KarrasDecay(sigma_rel=0.05),
]


def _ids(schedule: DecaySchedule) -> str:
    return repr(schedule)


# --------------------------------------------------------------------------------------------------
# Reference formulas, written independently of the module (often in an equivalent algebraic form).
# --------------------------------------------------------------------------------------------------


def ref_half_life(half_life: float, t: int) -> float:
    return math.exp(-math.log(2.0) / half_life)


def ref_warmup(decay: float, warmup: float, t: int) -> float:
    return min(decay, (1 + t) / (warmup + t))


def ref_power(decay: float, inv_gamma: float, power: float, min_decay: float, t: int) -> float:
    raw = 1.0 - math.exp(-power * math.log(1.0 + t / inv_gamma))
    return min(decay, max(min_decay, raw))


def ref_exponential_ramp(decay: float, gamma: float, t: int) -> float:
    return decay * (1.0 - math.exp(-(1 + t) / gamma))


def ref_cosine(start: float, end: float, total_steps: int, t: int) -> float:
    progress = min(t, total_steps) / total_steps
    return start + (end - start) * (1.0 - math.cos(math.pi * progress)) / 2.0


def ref_karras(gamma: float, t: int) -> float:
    if t == 1:
        return 0.0
    return math.exp((gamma + 1.0) * math.log1p(-1.0 / t))


def ref_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def plain_product(schedule: DecaySchedule, first: int, last: int) -> float:
    product = 1.0
    for step in range(first, last + 1):
        product *= schedule(step)
    return product


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.999, 0.9999])
def test_constant_decay(decay: float, t: int) -> None:
    assert ConstantDecay(decay)(t) == decay


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize("half_life", [0.1, 1, 10, 693.5, 1e6])
def test_half_life_decay(half_life: float, t: int) -> None:
    schedule = HalfLifeDecay(half_life)
    assert schedule(t) == pytest.approx(ref_half_life(half_life, t), rel=1e-14)
    assert schedule.decay == schedule(t)
    # The weight of a step halves after `half_life` steps.
    assert schedule(t) ** half_life == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize(("decay", "warmup"), [(0.999, 10), (0.9999, 10), (0.999, 100), (0.9, 1), (0.0, 10)])
def test_warmup_decay(decay: float, warmup: float, t: int) -> None:
    assert WarmupDecay(decay, warmup)(t) == pytest.approx(ref_warmup(decay, warmup, t), rel=1e-14, abs=0)


def test_warmup_decay_known_values() -> None:
    schedule = WarmupDecay(decay=0.999, warmup=10)
    assert schedule(1) == pytest.approx(2 / 11)
    assert schedule(10) == pytest.approx(11 / 20)
    assert schedule(100) == pytest.approx(101 / 110)
    assert schedule(10**6) == 0.999  # clipped
    # warmup=1 is a constant decay.
    assert all(WarmupDecay(decay=0.9, warmup=1)(t) == 0.9 for t in STEPS)


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize(
    ("decay", "inv_gamma", "power", "min_decay"),
    [(0.9999, 1.0, 2 / 3, 0.0), (0.999, 1.0, 0.75, 0.0), (0.99, 10.0, 1.0, 0.5), (0.9, 0.5, 2.0, 0.9)],
)
def test_power_decay(decay: float, inv_gamma: float, power: float, min_decay: float, t: int) -> None:
    schedule = PowerDecay(decay=decay, inv_gamma=inv_gamma, power=power, min_decay=min_decay)
    assert schedule(t) == pytest.approx(ref_power(decay, inv_gamma, power, min_decay, t), rel=1e-12)


def test_power_decay_defaults_and_clipping() -> None:
    schedule = PowerDecay()
    assert (schedule.decay, schedule.inv_gamma, schedule.power, schedule.min_decay) == (0.9999, 1.0, 2 / 3, 0.0)
    assert schedule(1) == pytest.approx(1 - 2 ** (-2 / 3))
    # 0.999 at about 31.6K steps, 0.9999 (the clip) from 1M steps on.
    assert schedule(31_622) == pytest.approx(0.999, abs=1e-7)
    assert schedule(10**6) == 0.9999
    assert schedule(10**9) == 0.9999
    assert schedule(999_000) < 0.9999
    # min_decay clips from below.
    clipped = PowerDecay(decay=0.999, min_decay=0.9)
    assert clipped(1) == 0.9
    assert clipped(100) > 0.9
    # min_decay == decay is a constant decay.
    assert all(PowerDecay(decay=0.99, min_decay=0.99)(t) == 0.99 for t in STEPS)


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize(("decay", "gamma"), [(0.9998, 2000), (0.9999, 2000), (0.99, 1), (0.0, 10)])
def test_exponential_ramp_decay(decay: float, gamma: float, t: int) -> None:
    schedule = ExponentialRampDecay(decay=decay, gamma=gamma)
    assert schedule(t) == pytest.approx(ref_exponential_ramp(decay, gamma, t), rel=1e-11, abs=0)


def test_exponential_ramp_matches_momentum_form() -> None:
    # The mmdet ExpMomentumEMA form: momentum_t = (1 - m) * exp(-(1 + t) / gamma) + m, m = 1 - decay.
    m, gamma = 0.0002, 2000
    schedule = ExponentialRampDecay(decay=1 - m, gamma=gamma)
    for t in STEPS:
        momentum = (1 - m) * math.exp(-(1 + t) / gamma) + m
        assert schedule(t) == pytest.approx(1 - momentum, rel=1e-9, abs=1e-15)
    assert schedule(10**6) == pytest.approx(0.9998, abs=1e-15)


@pytest.mark.parametrize("t", (*STEPS, 25, 49, 50, 51, 500, 999, 1000, 1001))
@pytest.mark.parametrize(
    ("start", "end", "total_steps"), [(0.996, 0.9999, 1000), (0.99, 0.9, 50), (0.0, 0.5, 1), (0.9, 0.9, 7)]
)
def test_cosine_decay(start: float, end: float, total_steps: int, t: int) -> None:
    schedule = CosineDecay(start=start, end=end, total_steps=total_steps)
    assert schedule(t) == pytest.approx(ref_cosine(start, end, total_steps, t), rel=1e-14, abs=1e-15)


def test_cosine_decay_endpoints() -> None:
    schedule = CosineDecay(start=0.996, end=0.9999, total_steps=1000)
    assert schedule(1) == pytest.approx(0.996, abs=1e-7)
    assert schedule(500) == pytest.approx((0.996 + 0.9999) / 2)
    assert schedule(1000) == 0.9999
    assert schedule(10**9) == 0.9999


@pytest.mark.parametrize("t", STEPS)
@pytest.mark.parametrize("gamma", [0, 0.5, 1, 6.94, 16.97, 100])
def test_karras_decay(gamma: float, t: int) -> None:
    assert KarrasDecay(gamma=gamma)(t) == pytest.approx(ref_karras(gamma, t), rel=1e-12, abs=0)


def test_karras_decay_first_update_is_a_copy_and_gamma_zero_is_the_mean() -> None:
    assert KarrasDecay(gamma=7)(1) == 0.0
    assert KarrasDecay(sigma_rel=0.2)(1) == 0.0
    schedule = KarrasDecay(gamma=0)
    weights = [3.0, -1.0, 4.0, 1.5, 9.0, 2.0]
    ema = 123.0  # the initial value is forgotten at step 1
    for t, w in enumerate(weights, start=1):
        d = schedule(t)
        ema = d * ema + (1 - d) * w
    assert ema == pytest.approx(sum(weights) / len(weights))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_values_are_floats_in_unit_interval(schedule: DecaySchedule) -> None:
    for t in (*STEPS, *range(1, 200)):
        value = schedule(t)
        assert type(value) is float
        # only a schedule that ends at 1 reaches it (CosineDecay(..., end=1.0)), and only from its end on
        reaches_one = isinstance(schedule, CosineDecay) and schedule.end == 1.0 and t >= schedule.total_steps
        assert 0.0 <= value <= 1.0 if reaches_one else 0.0 <= value < 1.0


@pytest.mark.parametrize(
    "schedule",
    [WarmupDecay(0.999), PowerDecay(), ExponentialRampDecay(), KarrasDecay(gamma=7), CosineDecay(0.9, 0.99, 100)],
    ids=_ids,
)
def test_ramps_are_non_decreasing(schedule: DecaySchedule) -> None:
    values = [schedule(t) for t in range(1, 3000)]
    assert all(a <= b for a, b in itertools.pairwise(values))


# --------------------------------------------------------------------------------------------------
# interval_decay
# --------------------------------------------------------------------------------------------------

INTERVALS = [
    (1, 1),
    (1, 2),
    (2, 2),
    (3, 3),
    (1, 10),
    (5, 17),
    (40, 60),
    (50, 120),
    (81, 90),
    (90, 130),
    (1, 300),
    (999, 1001),
    (1000, 1000),
    (12_000, 12_345),
]
EMPTY_INTERVALS = [(1, 0), (5, 4), (10, 3), (100, 1)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_interval_decay_is_the_product(schedule: DecaySchedule) -> None:
    for first, last in INTERVALS:
        expected = plain_product(schedule, first, last)
        assert schedule.interval_decay(first, last) == pytest.approx(expected, rel=1e-10, abs=1e-300)
    for first, last in EMPTY_INTERVALS:
        assert schedule.interval_decay(first, last) == 1.0
    # Length-1 intervals are the decay itself.
    for t in (1, 2, 7, 1000, 10**6):
        assert schedule.interval_decay(t, t) == pytest.approx(schedule(t), rel=1e-14, abs=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_interval_decay_composes(schedule: DecaySchedule) -> None:
    for first, middle, last in [(1, 1, 10), (1, 5, 10), (3, 80, 200), (90, 99, 130), (1, 999, 1500)]:
        whole = schedule.interval_decay(first, last)
        parts = schedule.interval_decay(first, middle) * schedule.interval_decay(middle + 1, last)
        assert whole == pytest.approx(parts, rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_interval_decay_long_interval(schedule: DecaySchedule) -> None:
    first, last = 7, 20_000
    values = [schedule(t) for t in range(first, last + 1)]
    expected = 0.0 if min(values) == 0.0 else math.exp(math.fsum(math.log(v) for v in values))
    if expected == 0.0:
        assert schedule.interval_decay(first, last) == pytest.approx(0.0, abs=1e-300)
    else:
        assert schedule.interval_decay(first, last) == pytest.approx(expected, rel=1e-9)


def test_interval_decay_closed_forms() -> None:
    for first, last in INTERVALS:
        n = last - first + 1
        assert ConstantDecay(0.99).interval_decay(first, last) == pytest.approx(0.99**n, rel=1e-14)
        assert HalfLifeDecay(100).interval_decay(first, last) == pytest.approx(0.5 ** (n / 100), rel=1e-14)
        for gamma in (0, 1, 6.94):
            expected = ((first - 1) / last) ** (gamma + 1)
            assert KarrasDecay(gamma=gamma).interval_decay(first, last) == pytest.approx(expected, rel=1e-14)
    assert HalfLifeDecay(250).interval_decay(1, 250) == pytest.approx(0.5, rel=1e-14)
    assert HalfLifeDecay(250).interval_decay(11, 510) == pytest.approx(0.25, rel=1e-14)
    assert KarrasDecay(gamma=3).interval_decay(1, 10) == 0.0
    assert KarrasDecay(gamma=1).interval_decay(11, 20) == pytest.approx(0.25, rel=1e-14)
    assert ConstantDecay(0.0).interval_decay(1, 0) == 1.0
    assert ConstantDecay(0.0).interval_decay(3, 3) == 0.0


def test_interval_decay_keeps_the_time_constant() -> None:
    # With weights constant over each interval, one update per interval using interval_decay gives
    # exactly the average obtained with one update per optimizer step.
    schedule = WarmupDecay(decay=0.99, warmup=10)
    boundaries = [0, 1, 4, 10, 11, 40, 100, 250, 251, 600]
    values = [2.0, -1.0, 0.5, 3.0, 7.0, -2.0, 1.0, 4.0, 0.0]
    per_step = per_interval = 10.0
    for (start, stop), w in zip(itertools.pairwise(boundaries), values, strict=True):
        for t in range(start + 1, stop + 1):
            d = schedule(t)
            per_step = d * per_step + (1 - d) * w
        d = schedule.interval_decay(start + 1, stop)
        per_interval = d * per_interval + (1 - d) * w
    assert per_interval == pytest.approx(per_step, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# KarrasDecay: sigma_rel <-> gamma
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [1e-6, 0.01, 0.05, 0.1, 0.15, 0.2, 0.28, 0.2886, math.sqrt(1 / 12)])
def test_karras_gamma_from_sigma_rel(sigma_rel: float) -> None:
    schedule = KarrasDecay(sigma_rel=sigma_rel)
    assert schedule.sigma_rel == sigma_rel
    assert schedule.gamma >= 0.0
    assert ref_sigma_rel(schedule.gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # gamma is a root of the cubic gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s), s = sigma_rel**-2,
    # and the largest one: the cubic is positive above it.
    s, g = sigma_rel**-2, schedule.gamma

    def cubic(x: float) -> float:
        return x**3 + 7 * x**2 + (16 - s) * x + (12 - s)

    assert abs(cubic(g)) <= 1e-9 * (g**3 + 7 * g**2 + (16 + s) * g + 12 + s)
    assert all(cubic(g + delta) > 0 for delta in (0.5, 1.0, 10.0, 1e3))


def test_karras_known_edm2_values() -> None:
    # The forward formula is the truth: sigma_rel = 0.10 is gamma ~ 6.94 and 0.05 is gamma ~ 16.97.
    assert KarrasDecay(sigma_rel=0.10).gamma == pytest.approx(6.94, abs=0.005)
    assert KarrasDecay(sigma_rel=0.05).gamma == pytest.approx(16.97, abs=0.005)
    assert ref_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)
    assert ref_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-4)
    assert KarrasDecay(gamma=6.94).sigma_rel == pytest.approx(0.10, abs=1e-4)


@pytest.mark.parametrize("gamma", [0, 1e-9, 0.5, 1, 6.94, 16.97, 100, 12_345.6, 1e9])
def test_karras_round_trip(gamma: float) -> None:
    by_gamma = KarrasDecay(gamma=gamma)
    assert by_gamma.gamma == gamma
    assert by_gamma.sigma_rel == pytest.approx(ref_sigma_rel(gamma), rel=1e-14)
    by_sigma_rel = KarrasDecay(sigma_rel=by_gamma.sigma_rel)
    assert by_sigma_rel.gamma == pytest.approx(gamma, rel=1e-9, abs=1e-6)
    for t in (2, 10, 1000):
        assert by_sigma_rel(t) == pytest.approx(by_gamma(t), rel=1e-9)


def test_karras_sigma_rel_range() -> None:
    # gamma = 0 is the largest sigma_rel; gamma -> inf sends sigma_rel to 0; sigma_rel decreases.
    assert KarrasDecay(gamma=0).sigma_rel == pytest.approx(math.sqrt(1 / 12), rel=1e-15)
    assert KarrasDecay(sigma_rel=math.sqrt(1 / 12)).gamma == 0.0
    assert KarrasDecay(sigma_rel=1 / math.sqrt(12)).gamma == pytest.approx(0.0, abs=1e-9)
    gammas = [0, 0.1, 1, 5, 50, 500, 5e4]
    sigmas = [KarrasDecay(gamma=g).sigma_rel for g in gammas]
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    assert KarrasDecay(gamma=1e12).sigma_rel < 1e-11
    # Very small sigma_rel still gives a finite gamma, about 1 / sigma_rel.
    assert KarrasDecay(sigma_rel=1e-100).gamma == pytest.approx(1e100, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# repr, config, equality, pickling
# --------------------------------------------------------------------------------------------------


def test_repr_and_config() -> None:
    schedule = WarmupDecay(decay=0.999, warmup=10)
    assert repr(schedule) == "WarmupDecay(decay=0.999, warmup=10.0)"
    assert schedule.config() == {"class": "WarmupDecay", "decay": 0.999, "warmup": 10.0}
    assert repr(ConstantDecay(0.9)) == "ConstantDecay(decay=0.9)"
    assert repr(HalfLifeDecay(500)) == "HalfLifeDecay(half_life=500.0)"
    assert repr(PowerDecay()) == "PowerDecay(decay=0.9999, inv_gamma=1.0, power=0.6666666666666666, min_decay=0.0)"
    assert repr(ExponentialRampDecay()) == "ExponentialRampDecay(decay=0.9998, gamma=2000.0)"
    assert repr(CosineDecay(0.996, 0.9999, 100)) == "CosineDecay(start=0.996, end=0.9999, total_steps=100)"
    assert repr(CosineDecay(0.996, 1, 100)) == "CosineDecay(start=0.996, end=1.0, total_steps=100)"
    assert repr(KarrasDecay(sigma_rel=0.05)) == "KarrasDecay(sigma_rel=0.05)"
    assert repr(KarrasDecay(gamma=7)) == "KarrasDecay(gamma=7.0)"
    assert KarrasDecay(sigma_rel=0.05).config() == {"class": "KarrasDecay", "gamma": None, "sigma_rel": 0.05}
    assert KarrasDecay(gamma=6.94).config() == {"class": "KarrasDecay", "gamma": 6.94, "sigma_rel": None}
    assert CosineDecay(0.9, 0.99, 10).config() == {
        "class": "CosineDecay",
        "start": 0.9,
        "end": 0.99,
        "total_steps": 10,
    }


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_config_rebuilds_the_schedule(schedule: DecaySchedule) -> None:
    config = schedule.config()
    assert all(value is None or type(value) in (int, float, str) for value in config.values())
    class_name = config.pop("class")
    assert isinstance(class_name, str)
    cls = getattr(schedules_module, class_name)
    rebuilt = cls(**config)
    assert rebuilt == schedule
    assert eval(repr(schedule), vars(schedules_module)) == schedule


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_pickle_round_trip(schedule: DecaySchedule) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(schedule, protocol=protocol))
        assert copy is not schedule
        assert type(copy) is type(schedule)
        assert copy == schedule
        assert hash(copy) == hash(schedule)
        assert repr(copy) == repr(schedule)
        assert [copy(t) for t in STEPS] == [schedule(t) for t in STEPS]
        assert copy.interval_decay(3, 500) == schedule.interval_decay(3, 500)


# pickle.dumps(WarmupDecay(0.99, 10), protocol=2) as written before the schedules moved into private modules.
_PICKLE_BEFORE_THE_SPLIT = (
    b"\x80\x02clightning_ema.schedules\nWarmupDecay\nq\x00)\x81q\x01}q\x02(X\x05\x00\x00\x00decayq\x03G?\xef"
    b"\xae\x14z\xe1G\xaeX\x06\x00\x00\x00warmupq\x04G@$\x00\x00\x00\x00\x00\x00ub."
)


def test_schedules_are_pickled_under_their_public_module(tmp_path: Path) -> None:
    # The classes live in private modules; pickles, reprs and YAML class paths must keep naming
    # lightning_ema.schedules, so that checkpoints and safe-globals allowlists written before the split still load.
    for name in schedules_module.__all__:
        value = getattr(schedules_module, name)
        if isinstance(value, type):
            assert value.__module__ == "lightning_ema.schedules", name
            assert value.__qualname__ == name
    old = pickle.loads(_PICKLE_BEFORE_THE_SPLIT)
    assert type(old) is WarmupDecay
    assert old == WarmupDecay(0.99, 10)
    assert pickle.dumps(WarmupDecay(0.99, 10), protocol=2) == _PICKLE_BEFORE_THE_SPLIT
    torch = pytest.importorskip("torch")
    path = tmp_path / "schedules.pt"
    torch.save(SCHEDULES, path)
    # the package allowlists the built-in schedules by their public path (add_safe_globals, at import)
    assert torch.load(path, weights_only=True) == SCHEDULES


def test_equality_and_hash() -> None:
    assert WarmupDecay(0.999, 10) == WarmupDecay(decay=0.999, warmup=10.0)
    assert hash(WarmupDecay(0.999, 10)) == hash(WarmupDecay(0.999, 10.0))
    assert WarmupDecay(0.999, 10) != WarmupDecay(0.999, 11)
    assert ConstantDecay(0.9) != WarmupDecay(0.9, warmup=1)  # same values, different schedule
    assert ConstantDecay(0.9) != 0.9
    assert ConstantDecay(0.9) != "ConstantDecay(decay=0.9)"
    assert KarrasDecay(gamma=1) != KarrasDecay(gamma=2)
    assert len({ConstantDecay(0.9), ConstantDecay(0.9), HalfLifeDecay(10), HalfLifeDecay(10.0)}) == 2
    # Schedules are described by their arguments: the same EMA given two ways is two configurations.
    assert KarrasDecay(sigma_rel=0.05) != KarrasDecay(gamma=KarrasDecay(sigma_rel=0.05).gamma)


def test_numpy_scalars_are_stored_as_plain_values() -> None:
    np = pytest.importorskip("numpy")
    schedule = CosineDecay(np.float64(0.9), np.float32(0.5), np.int64(10))
    assert [type(value) for value in schedule.config().values()] == [str, float, float, int]
    assert WarmupDecay(np.float64(0.99), np.int32(10)) == WarmupDecay(0.99, 10)
    assert schedule(np.int64(3)) == schedule(3)
    assert type(KarrasDecay(gamma=np.float64(2.0)).config()["gamma"]) is float


# --------------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------------


class _Halving(DecaySchedule):
    """A user schedule relying on the base class: decay_t = 1 - scale / (t + 1)."""

    def __init__(self, scale: float = 0.5) -> None:
        self.scale = scale

    def __call__(self, step: int) -> float:
        return 1.0 - self.scale / (step + 1)


class _Opaque(DecaySchedule):
    def __init__(self, scale: float = 0.5) -> None:
        self._scale = scale

    def __call__(self, step: int) -> float:
        return 0.5


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError):
        DecaySchedule()  # type: ignore[abstract]


def test_user_subclass_gets_defaults() -> None:
    schedule = _Halving(0.25)
    assert schedule.config() == {"class": "_Halving", "scale": 0.25}
    assert repr(schedule) == "_Halving(scale=0.25)"
    assert schedule == _Halving(0.25)
    assert schedule != _Halving(0.5)
    assert schedule.interval_decay(2, 9) == pytest.approx(plain_product(schedule, 2, 9), rel=1e-15)
    assert schedule.interval_decay(9, 2) == 1.0
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    with pytest.raises(ValueError, match="`first_step`"):
        schedule.interval_decay(0, 3)


def test_user_subclass_without_attributes_must_override_config() -> None:
    with pytest.raises(TypeError, match="`scale`"):
        _Opaque().config()


# --------------------------------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------------------------------

BAD_DECAYS = [-0.1, -1, 1.0, 1, 1.5, NAN, INF, -INF, True, False, "0.9", None, [0.9]]
BAD_POSITIVE = [0, 0.0, -1, -1e-9, NAN, INF, True, "10", None, 10**400]
# A schedule may reach 1 (CosineDecay's end, BYOL/DINO); only values outside [0, 1] are refused.
BAD_SCHEDULE_DECAYS = [-0.1, -1, 1.0000001, 1.5, 2, NAN, INF, -INF, True, False, "0.9", None, [0.9]]

BAD_ARGUMENTS: list[tuple[Callable[[Any], DecaySchedule], str, list[Any]]] = [
    (lambda v: ConstantDecay(decay=v), "decay", BAD_DECAYS),
    (lambda v: HalfLifeDecay(half_life=v), "half_life", BAD_POSITIVE),
    (lambda v: WarmupDecay(decay=v), "decay", BAD_DECAYS),
    (lambda v: WarmupDecay(decay=0.99, warmup=v), "warmup", [0, 0.5, 0.999, -1, NAN, INF, True, "10", None]),
    (lambda v: PowerDecay(decay=v), "decay", BAD_DECAYS),
    (lambda v: PowerDecay(inv_gamma=v), "inv_gamma", BAD_POSITIVE),
    (lambda v: PowerDecay(power=v), "power", BAD_POSITIVE),
    (lambda v: PowerDecay(decay=0.99, min_decay=v), "min_decay", [-0.1, 0.995, 1.0, NAN, INF, True, "0", None]),
    (lambda v: ExponentialRampDecay(decay=v), "decay", BAD_DECAYS),
    (lambda v: ExponentialRampDecay(gamma=v), "gamma", BAD_POSITIVE),
    (lambda v: CosineDecay(start=v, end=0.99, total_steps=10), "start", BAD_SCHEDULE_DECAYS),
    (lambda v: CosineDecay(start=0.99, end=v, total_steps=10), "end", BAD_SCHEDULE_DECAYS),
    (lambda v: CosineDecay(start=1.0, end=v, total_steps=10), "end", [1.0, 1]),
    (
        lambda v: CosineDecay(start=0.9, end=0.99, total_steps=v),
        "total_steps",
        [0, -1, 10.0, 1.5, NAN, INF, True, "10", None],
    ),
    (lambda v: KarrasDecay(gamma=v), "gamma", [-1, -1e-12, NAN, INF, -INF, True, False, "1"]),
    (
        lambda v: KarrasDecay(sigma_rel=v),
        "sigma_rel",
        [0, 0.0, -0.1, 0.289, 0.3, 1.0, 1e-200, NAN, INF, True, "0.1"],
    ),
]


@pytest.mark.parametrize(
    ("factory", "name", "value"),
    [(factory, name, value) for factory, name, values in BAD_ARGUMENTS for value in values],
    ids=lambda x: repr(x) if not callable(x) else "",
)
def test_invalid_arguments(factory: Callable[[Any], DecaySchedule], name: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        factory(value)
    message = str(info.value)
    assert f"`{name}` must be " in message
    assert f"got {value!r}." in message


@pytest.mark.parametrize(("gamma", "sigma_rel"), [(None, None), (7.0, 0.05), (0, 0.1)])
def test_karras_needs_exactly_one_argument(gamma: float | None, sigma_rel: float | None) -> None:
    with pytest.raises(ValueError) as info:
        KarrasDecay(gamma=gamma, sigma_rel=sigma_rel)
    message = str(info.value)
    assert "`gamma`" in message
    assert "`sigma_rel`" in message
    assert f"gamma={gamma!r}" in message
    assert f"sigma_rel={sigma_rel!r}" in message


def test_sigma_rel_error_states_the_range() -> None:
    with pytest.raises(ValueError, match=r"\(0, 0\.2887\]"):
        KarrasDecay(sigma_rel=0.3)


def test_decay_of_one_has_a_hint() -> None:
    with pytest.raises(ValueError, match="freeze"):
        ConstantDecay(1.0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
@pytest.mark.parametrize("step", [0, -1, 1.5, 2.0, True, False, "1", None])
def test_invalid_step(schedule: DecaySchedule, step: Any) -> None:
    with pytest.raises(ValueError) as info:
        schedule(step)
    assert f"`step` must be an integer >= 1, got {step!r}." in str(info.value)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=_ids)
def test_invalid_interval(schedule: DecaySchedule) -> None:
    for first in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError) as info:
            schedule.interval_decay(first, 10)  # type: ignore[arg-type]
        assert f"`first_step` must be an integer >= 1, got {first!r}." in str(info.value)
    for last in (-1, 1.5, True, None):
        with pytest.raises(ValueError) as info:
            schedule.interval_decay(1, last)  # type: ignore[arg-type]
        assert f"`last_step` must be an integer >= 0, got {last!r}." in str(info.value)


# --------------------------------------------------------------------------------------------------
# as_schedule
# --------------------------------------------------------------------------------------------------


def test_as_schedule() -> None:
    schedule = as_schedule(0.999)
    assert schedule == ConstantDecay(0.999)
    assert isinstance(schedule, ConstantDecay)
    zero = as_schedule(0)
    assert zero == ConstantDecay(0.0)
    assert type(zero(1)) is float
    warmup = WarmupDecay(0.999)
    assert as_schedule(warmup) is warmup
    assert as_schedule(warmup, name="teacher_decay") is warmup


@pytest.mark.parametrize("value", [1.0, 1, -0.1, 2, NAN, INF, True, False, "0.9", None, [0.9], object])
@pytest.mark.parametrize("name", ["decay", "teacher_decay"])
def test_as_schedule_rejects(value: Any, name: str) -> None:
    with pytest.raises(ValueError) as info:
        as_schedule(value, name=name)
    message = str(info.value)
    assert message.startswith(
        f"`{name}` must be a float in [0, 1) or a DecaySchedule from lightning_ema.schedules, got {value!r}."
    )


def test_public_names() -> None:
    assert schedules_module.__all__ == sorted(schedules_module.__all__)
    for name in schedules_module.__all__:
        assert hasattr(schedules_module, name)


# --------------------------------------------------------------------------------------------------
# Schedules that reach 1 (issue 9, item 8): BYOL/DINO teachers end at exactly 1
# --------------------------------------------------------------------------------------------------


def test_cosine_decay_may_end_at_one_and_then_freezes_the_average() -> None:
    schedule = CosineDecay(start=0.996, end=1.0, total_steps=100)
    for t in (1, 37, 99, 100):
        assert schedule(t) == pytest.approx(1.0 - 0.004 * (math.cos(math.pi * t / 100) + 1.0) / 2.0, abs=1e-15)
    assert [schedule(t) for t in (100, 101, 10**6)] == [1.0, 1.0, 1.0]
    # an update covering only steps past the end has weight exactly 0: the average does not move
    assert schedule.interval_decay(100, 10**6) == 1.0
    assert schedule.interval_decay(95, 200) == pytest.approx(plain_product(schedule, 95, 200), rel=1e-15)
    assert CosineDecay(start=1.0, end=0.99, total_steps=10)(10) == 0.99


@pytest.mark.parametrize(
    "make",
    [lambda: ConstantDecay(1.0), lambda: CosineDecay(1.0, 1.0, 10), lambda: as_schedule(1.0), lambda: as_schedule(1)],
    ids=["ConstantDecay", "CosineDecay-constant", "as_schedule-float", "as_schedule-int"],
)
def test_a_constant_decay_of_one_stays_refused(make: Callable[[], DecaySchedule]) -> None:
    with pytest.raises(ValueError, match="freeze"):
        make()


# --------------------------------------------------------------------------------------------------
# One normalised configuration (issue 9, item 9)
# --------------------------------------------------------------------------------------------------

EQUAL_PAIRS = [
    (WarmupDecay(0.995, 10), WarmupDecay(0.995, 10.0)),
    (HalfLifeDecay(500), HalfLifeDecay(500.0)),
    (PowerDecay(0.999, inv_gamma=1, power=1), PowerDecay(0.999, inv_gamma=1.0, power=1.0)),
    (ExponentialRampDecay(0.9998, 2000), ExponentialRampDecay(0.9998, 2000.0)),
    (KarrasDecay(gamma=7), KarrasDecay(gamma=7.0)),
    (CosineDecay(0, 1, 10), CosineDecay(0.0, 1.0, 10)),
    (ConstantDecay(0), ConstantDecay(0.0)),
    (MomentumWarmupDecay(0.5, 10), MomentumWarmupDecay(0.5, 10.0)),
]


@pytest.mark.parametrize(("first", "second"), EQUAL_PAIRS, ids=lambda pair: repr(pair))
def test_equal_configurations_have_one_repr_config_and_hash(first: DecaySchedule, second: DecaySchedule) -> None:
    assert first == second
    assert repr(first) == repr(second)
    assert first.config() == second.config()
    assert [type(value) for value in first.config().values()] == [type(v) for v in second.config().values()]
    assert hash(first) == hash(second)


OLD_REPRS = {  # reprs as versions before the normalisation wrote them into checkpoints
    "WarmupDecay(decay=0.995, warmup=10)": "WarmupDecay(decay=0.995, warmup=10.0)",
    "HalfLifeDecay(half_life=500)": "HalfLifeDecay(half_life=500.0)",
    "ExponentialRampDecay(decay=0.9998, gamma=2000)": "ExponentialRampDecay(decay=0.9998, gamma=2000.0)",
    "KarrasDecay(gamma=7)": "KarrasDecay(gamma=7.0)",
    "PowerDecay(decay=0.9999, inv_gamma=1, power=1, min_decay=0)": (
        "PowerDecay(decay=0.9999, inv_gamma=1.0, power=1.0, min_decay=0.0)"
    ),
    "ConstantDecay(decay=0.9)": "ConstantDecay(decay=0.9)",
    "MomentumWarmupDecay(momentum=0.0002, warmup=100)": "MomentumWarmupDecay(momentum=0.0002, warmup=100.0)",
    "CosineDecay(start=0.9, end=1, total_steps=10)": "CosineDecay(start=0.9, end=1.0, total_steps=10)",
}


@pytest.mark.parametrize(("old", "new"), OLD_REPRS.items())
def test_normalize_repr_maps_older_reprs_to_todays(old: str, new: str) -> None:
    assert normalize_repr(old) == new
    assert normalize_repr(new) == new


@pytest.mark.parametrize(
    "text",
    [
        "MySchedule(scale=2)",  # not a built-in: left as written
        "ConstantDecay(0.9)",  # positional: not what repr writes
        "ConstantDecay(decay=1.5)",  # invalid: left as written, never raised
        "ConstantDecay(decay=__import__('os').getcwd())",  # not a literal: never evaluated
        "average",
        "torch.float32",
        "",
        "ConstantDecay(decay=0.9",
    ],
)
def test_normalize_repr_leaves_anything_else_unchanged(text: str) -> None:
    assert normalize_repr(text) == text


# --------------------------------------------------------------------------------------------------
# validate(): schedules are checked wherever they come from (issue 13, case 6)
# --------------------------------------------------------------------------------------------------

TAMPERED: list[tuple[DecaySchedule, str, object]] = [
    (ConstantDecay(0.9), "decay", 1.5),
    (HalfLifeDecay(10), "half_life", -1.0),
    (WarmupDecay(0.99), "warmup", 0.5),
    (PowerDecay(), "power", NAN),
    (PowerDecay(), "min_decay", 0.99999),
    (ExponentialRampDecay(), "decay", 1.0),
    (CosineDecay(0.9, 0.99, 10), "end", 1.5),
    (CosineDecay(0.9, 0.99, 10), "total_steps", 0),
    (KarrasDecay(gamma=1.0), "_gamma_argument", -2.0),
    (MomentumWarmupDecay(), "momentum", 0.0),
]


@pytest.mark.parametrize(("schedule", "attribute", "value"), TAMPERED, ids=lambda x: repr(x))
def test_a_schedule_edited_behind_its_constructor_is_refused(
    schedule: DecaySchedule, attribute: str, value: object
) -> None:
    setattr(schedule, attribute, value)
    with pytest.raises(ValueError, match=re.escape(f"got {value!r}")):
        schedule.validate()
    with pytest.raises(ValueError, match=r"^`teacher_decay` must be a valid schedule") as info:
        as_schedule(schedule, name="teacher_decay")
    assert f"got {value!r}" in str(info.value)


@pytest.mark.parametrize(("schedule", "attribute", "value"), TAMPERED, ids=lambda x: repr(x))
def test_unpickling_validates_like_the_constructor(schedule: DecaySchedule, attribute: str, value: object) -> None:
    # Built without calling __init__, as a crafted file would deliver it.
    crafted = object.__new__(type(schedule))
    crafted.__dict__.update({**vars(schedule), attribute: value})
    payload = pickle.dumps(crafted)
    with pytest.raises(ValueError, match=f"A saved {type(schedule).__name__} is invalid") as info:
        pickle.loads(payload)
    assert f"got {value!r}" in str(info.value)


def test_missing_attributes_and_odd_states_are_refused() -> None:
    crafted = object.__new__(ConstantDecay)
    crafted.__dict__["unrelated"] = 1
    with pytest.raises(ValueError, match=r"`decay` must be a float in \[0, 1\), got nothing \(the attribute"):
        pickle.loads(pickle.dumps(crafted))
    # a pickle with no state at all skips __setstate__; as_schedule, which every consumer calls, still refuses it
    empty = pickle.loads(pickle.dumps(object.__new__(ConstantDecay)))
    with pytest.raises(ValueError, match="got nothing"):
        as_schedule(empty)
    with pytest.raises(ValueError, match="must hold a dict of attributes"):
        ConstantDecay(0.9).__setstate__(("decay", 0.9))


def test_valid_schedules_survive_validate_unchanged() -> None:
    for schedule in SCHEDULES:
        before = repr(schedule)
        schedule.validate()
        assert repr(schedule) == before
        assert as_schedule(schedule) is schedule
