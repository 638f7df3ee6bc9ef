"""Plain re-implementations of the update rules of the EMA hooks lightning_ema.compat replaces.

Nothing here imports lightning_ema: each function replays, over weights recorded from a real Trainer, what the
original library does to its EMA model, written after its source code (mmcv 1.x ``EMAHook``, mmengine
``EMAHook`` + mmyolo ``ExpMomentumEMA``, timm ``ModelEma``, mmdet ``MeanTeacherHook``, mmagic
``ExponentialMovingAverageHook``, and the warm-ups of timm ``ModelEmaV3``, diffusers ``EMAModel``, torch-ema and
ema-pytorch). Floating-point tensors are replayed in float64, so that the reference is the rule itself rather than
one more float32 rounding of it (the originals' own float32 formulas, ``mul_``/``add_`` or ``lerp_``, differ from
each other by a few units in the last place per update); integer tensors keep the originals' arithmetic exactly
(float32 products cast back by ``copy_``), since for them that arithmetic is the rule. Each returns the EMA model's
full ``state_dict`` after every iteration.

``initial`` is the model's ``state_dict`` when training starts, ``states[i]`` after iteration ``i`` (0-based, the
originals' ``runner.iter``; optimizer step ``i + 1``), ``parameters`` the names of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

State = dict[str, Tensor]


def _clone(state: State) -> State:
    return {name: tensor.clone() for name, tensor in state.items()}


def _f64(state: State) -> State:
    """Floating-point tensors in float64 (integers as they are)."""
    return {name: t.double() if t.is_floating_point() else t.clone() for name, t in state.items()}


def _exact(initial: State, states: Sequence[State]) -> tuple[State, list[State]]:
    return _f64(initial), [_f64(state) for state in states]


def mmcv_ema_hook(
    initial: State, states: Sequence[State], parameters: Sequence[str], momentum: float, interval: int, warm_up: float
) -> list[State]:
    """mmcv 1.x ``EMAHook``: ``ema_*`` buffers of the parameters; the EMA model swaps parameters only."""
    initial, states = _exact(initial, states)
    momentum = momentum**interval
    ema = {name: initial[name].clone() for name in parameters}
    out = []
    for i, state in enumerate(states):
        m = min(momentum, (1 + i) / (warm_up + i))
        if i % interval == 0:
            for name in parameters:
                ema[name].mul_(1 - m).add_(state[name], alpha=m)
        out.append({**_clone(state), **_clone(ema)})
    return out


def mmyolo_exp_momentum_ema(
    initial: State,
    states: Sequence[State],
    parameters: Sequence[str],
    momentum: float,
    gamma: float,
    interval: int,
    update_buffers: bool,
    begin_iter: int = 0,
) -> list[State]:
    """mmengine ``EMAHook`` driving mmyolo's ``ExpMomentumEMA``.

    The buffers of ``update_buffers=False`` follow the model's at every call: what the original intends (its
    ``src_buffers`` generator is exhausted after the first call, a bug lightning_ema.compat does not copy).
    """
    initial, states = _exact(initial, states)
    module = _clone(initial)
    averaged = list(module) if update_buffers else list(parameters)
    steps = 0
    out = []
    for i, state in enumerate(states):
        if i + 1 >= begin_iter:  # EMAHook._ema_started
            if steps == 0:
                for name in averaged:
                    module[name].copy_(state[name])
            elif steps % interval == 0:
                m = (1 - momentum) * math.exp(-float(1 + steps) / gamma) + momentum
                for name in averaged:
                    if module[name].dtype.is_floating_point:
                        module[name].lerp_(state[name], m)
            if not update_buffers:
                for name in module:
                    if name not in parameters:
                        module[name].copy_(state[name])
            steps += 1
        else:
            for name in module:
                module[name].copy_(state[name])
        out.append(_clone(module))
    return out


def timm_model_ema(initial: State, states: Sequence[State], decay: float) -> list[State]:
    """timm ``ModelEma`` (v1): every ``state_dict`` entry, integers through float32 and ``copy_``."""
    initial, states = _exact(initial, states)
    ema = _clone(initial)
    out = []
    for state in states:
        for name, ema_v in ema.items():
            ema_v.copy_(ema_v * decay + (1.0 - decay) * state[name])
        out.append(_clone(ema))
    return out


def mmdet_mean_teacher_hook(
    student_at_start: State,
    teacher_at_start: State,
    states: Sequence[State],
    parameters: Sequence[str],
    momentum: float,
    interval: int,
    skip_buffers: bool,
) -> list[State]:
    """mmdet ``MeanTeacherHook``: a copy at iteration 0, then ``teacher * (1 - m) + student * m``."""
    student_at_start, teacher_at_start = _f64(student_at_start), _f64(teacher_at_start)
    states = [_f64(state) for state in states]
    teacher = _clone(teacher_at_start)

    def momentum_update(student: State, m: float) -> None:
        names = parameters if skip_buffers else list(student)
        for name in names:
            if teacher[name].dtype.is_floating_point:
                teacher[name].mul_(1 - m).add_(student[name], alpha=m)

    momentum_update(student_at_start, 1)  # before_train at runner.iter == 0
    out = []
    for i, state in enumerate(states):
        if (i + 1) % interval == 0:
            momentum_update(state, momentum)
        out.append(_clone(teacher))
    return out


def mmagic_ema_hook(
    initial: State,
    states: Sequence[State],
    trainable: Sequence[str],
    momentum: float,
    momentum_nontrainable: float,
    interval: int,
    start_iter: int,
) -> list[State]:
    """mmagic ``ExponentialMovingAverageHook`` over one module's ``state_dict`` (the ``X`` of ``X_ema``)."""
    initial, states = _exact(initial, states)
    ema = _clone(initial)
    out = []
    for i, state in enumerate(states):
        if i < start_iter:
            due = True
        else:
            due = (i + 1 - start_iter) % interval == 0 if interval > 0 else False
        if due:
            for name, value in state.items():
                if i < start_iter:
                    ema[name].copy_(value)
                else:
                    m = momentum if name in trainable else momentum_nontrainable
                    ema[name].copy_(ema[name] + (value - ema[name]) * m)  # load_state_dict casts back
        out.append(_clone(ema))
    return out


def warmup_ema(
    initial: State, states: Sequence[State], names: Sequence[str], decay_at: Callable[[int], float]
) -> list[State]:
    """An EMA updated after every step ``t = 1, 2, ...`` with ``decay_at(t)`` (``0`` copies)."""
    initial, states = _exact(initial, states)
    ema = {name: initial[name].clone() for name in names}
    out = []
    for t, state in enumerate(states, start=1):
        d = decay_at(t)
        for name in names:
            ema[name].lerp_(state[name], 1.0 - d)
        out.append(_clone(ema))
    return out


def timm_v3_decay(
    decay: float, min_decay: float, update_after_step: int, gamma: float, power: float
) -> Callable[[int], float]:
    """timm ``ModelEmaV3.get_decay(step)`` with ``use_warmup=True`` (``step``: optimizer steps done)."""

    def get_decay(step: int) -> float:
        step = max(0, step - update_after_step - 1)
        if step <= 0:
            return 0.0
        value = 1 - (1 + step / gamma) ** -power
        return max(min(value, decay), min_decay)

    return get_decay


def diffusers_decay(
    decay: float, update_after_step: int, use_ema_warmup: bool, inv_gamma: float, power: float
) -> Callable[[int], float]:
    """diffusers ``EMAModel.get_decay(optimization_step)`` (``min_decay=0``)."""

    def get_decay(optimization_step: int) -> float:
        step = max(0, optimization_step - update_after_step - 1)
        if step <= 0:
            return 0.0
        value = 1 - (1 + step / inv_gamma) ** -power if use_ema_warmup else (1 + step) / (10 + step)
        return max(min(value, decay), 0.0)

    return get_decay


def torch_ema_decay(decay: float) -> Callable[[int], float]:
    """torch-ema ``ExponentialMovingAverage(use_num_updates=True)``: ``num_updates`` counts this update."""
    return lambda num_updates: min(decay, (1 + num_updates) / (10 + num_updates))


def ema_pytorch_decay(beta: float, update_after_step: int, inv_gamma: float, power: float) -> Callable[[int], float]:
    """ema-pytorch ``EMA(update_every=1)``: the decay of its update after optimizer step ``t`` (``0`` copies)."""

    def decay_at(t: int) -> float:
        step = t - 1  # `self.step` before this call
        if step == 0 or step <= update_after_step:
            return 0.0  # initial copy, then copies up to update_after_step
        epoch = max(step + 1 - update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        return min(max(1 - (1 + epoch / inv_gamma) ** -power, 0.0), beta)

    return decay_at


__all__ = [
    "diffusers_decay",
    "ema_pytorch_decay",
    "mmagic_ema_hook",
    "mmcv_ema_hook",
    "mmdet_mean_teacher_hook",
    "mmyolo_exp_momentum_ema",
    "timm_model_ema",
    "timm_v3_decay",
    "torch_ema_decay",
    "warmup_ema",
]
