"""The step-rule options other libraries' EMAs need, on the public EMA in a plain loop (no Trainer).

Expected values are closed forms or plain float64 loops written here.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from lightning_ema import EMA
from lightning_ema.ema import EMAConfig
from lightning_ema.schedules import ConstantDecay, ExponentialRampDecay, MomentumWarmupDecay


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def due_steps(ema: EMA, steps: int = 14) -> list[int]:
    return [step for step in range(1, steps + 1) if ema.update(step) is not None]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"every_n_steps": 3}, [3, 6, 9, 12]),
        ({"every_n_steps": 3, "phase": 1}, [1, 4, 7, 10, 13]),
        ({"every_n_steps": 3, "phase": 5}, [2, 5, 8, 11, 14]),
        ({"every_n_steps": 3, "start_step": 4}, [3, 6, 9, 12]),
        ({"every_n_steps": 3, "start_step": 4, "count_from_start": True}, [1, 2, 3, 4, 7, 10, 13]),
        ({"start_step": 2, "count_from_start": True, "stop_step": 5}, [1, 2, 3, 4, 5]),
        ({"every_n_steps": 2, "stop_step": 7}, [2, 4, 6]),
    ],
)
def test_which_steps_update(options: dict[str, object], expected: list[int]) -> None:
    assert due_steps(EMA(net(), 0.9, **options)) == expected


def test_decay_per_update_and_schedules_counted_from_start() -> None:
    module = net()
    schedule = ExponentialRampDecay(0.99, gamma=5)
    ema = EMA(
        module, schedule, every_n_steps=2, start_step=3, count_from_start=True, decay_per="update", buffers="ignore"
    )
    weight = module[0].weight
    expected = None
    for step in range(1, 12):
        with torch.no_grad():
            weight.add_(0.1 * step)
        returned = ema.update(step)
        if step <= 3:
            expected = weight.detach().double().clone()
            assert returned == 0.0
        elif (step - 3) % 2 == 0:
            d = schedule(step - 3)  # one decay per update, the schedule counted from start_step
            assert returned == d
            expected = d * expected + (1 - d) * weight.detach().double()
        else:
            assert returned is None
        torch.testing.assert_close(ema.ema_state_dict()["0.weight"].double(), expected, rtol=0, atol=1e-6)


def test_a_separate_decay_for_buffers_and_truncated_integer_averages() -> None:
    module = net()
    ema = EMA(module, 0.9, buffer_decay=0.5, integer_buffers="average", nonfinite="ignore")
    bn = module[1]
    params, mean, count = bn.weight.detach().double().clone(), bn.running_mean.double().clone(), 0
    for step in range(1, 9):
        with torch.no_grad():
            bn.weight.add_(1.0)
            bn.running_mean.add_(2.0)
            bn.num_batches_tracked.add_(3)
        ema.update(step)
        params = 0.9 * params + 0.1 * bn.weight.detach().double()
        mean = 0.5 * mean + 0.5 * bn.running_mean.double()
        count = math.trunc(0.5 * count + 0.5 * int(bn.num_batches_tracked))
        state = ema.ema_state_dict()
        torch.testing.assert_close(state["1.weight"].double(), params, rtol=0, atol=1e-6)
        torch.testing.assert_close(state["1.running_mean"].double(), mean, rtol=0, atol=1e-6)
        assert int(state["1.num_batches_tracked"]) == count and state["1.num_batches_tracked"].dtype == torch.int64


def test_kept_integer_buffers_change_only_while_the_ema_copies() -> None:
    module = net()
    ema = EMA(module, 0.9, start_step=2, integer_buffers="keep")
    for step in range(1, 6):
        module[1].num_batches_tracked.fill_(10 * step)
        ema.update(step)
    assert int(ema.ema_state_dict()["1.num_batches_tracked"]) == 20  # the copy at step 2
    module[1].num_batches_tracked.fill_(99)
    with torch.no_grad():
        module[0].bias.fill_(7.0)
    ema.copy_from_module()  # mmdet's re-copy: averaged tensors copied, kept integers left
    state = ema.ema_state_dict()
    assert int(state["1.num_batches_tracked"]) == 20 and torch.equal(state["0.bias"], torch.full((4,), 7.0))


def test_momentum_warmup_decay_is_mmcvs_cap_and_its_interval_product_is_exact() -> None:
    schedule = MomentumWarmupDecay(momentum=0.3, warmup=10)
    for t in range(1, 40):
        i = t - 1  # mmcv's runner.iter
        assert schedule(t) == pytest.approx(1 - min(0.3, (1 + i) / (10 + i)), rel=1e-15)
    generator = random.Random(0)
    for _ in range(50):
        momentum, warmup = generator.uniform(0.01, 0.9), generator.uniform(0.5, 200)
        schedule = MomentumWarmupDecay(momentum, warmup)
        first, last = generator.randint(1, 30), generator.randint(30, 400)
        product = math.prod(schedule(s) for s in range(first, last + 1))
        assert schedule.interval_decay(first, last) == pytest.approx(product, rel=1e-12)
    with pytest.raises(ValueError, match="`momentum` must be a float in \\(0, 1\\)"):
        MomentumWarmupDecay(momentum=1.0)
    with pytest.raises(ValueError, match="`warmup` must be a finite number > 0"):
        MomentumWarmupDecay(warmup=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"phase": -1}, "`phase` must be an integer >= 0, got -1."),
        ({"count_from_start": "yes"}, "`count_from_start` must be True or False, got 'yes'."),
        ({"decay_per": "epoch"}, "`decay_per` must be one of 'step', 'update', got 'epoch'."),
        ({"buffer_decay": 1.0}, "`buffer_decay` must be a float in [0, 1)"),
        ({"buffer_decay": 0.5, "buffers": "copy"}, "`buffer_decay` must be None unless buffers='average'"),
        ({"integer_buffers": "round"}, "`integer_buffers` must be one of 'copy', 'average', 'keep', got 'round'."),
        ({"integer_buffers": "keep", "buffers": "ignore"}, "`integer_buffers` must be 'copy' unless buffers='average'"),
        ({"stop_step": 1.5}, "`stop_step` must be an integer >= 0, got 1.5."),
    ],
)
def test_bad_step_rule_options_name_the_argument_and_value(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        EMAConfig.create(0.9, **options)  # type: ignore[arg-type]


def test_only_changed_step_rule_settings_are_described() -> None:
    assert "phase" not in EMAConfig.create(0.9).describe()
    described = EMAConfig.create(0.9, phase=1, decay_per="update", buffer_decay=ConstantDecay(0.5)).describe()
    assert (described["phase"], described["decay_per"], described["buffer_decay"]) == (
        1,
        "update",
        "ConstantDecay(decay=0.5)",
    )
