"""The EMA hooks lightning-ema replaces, as ``EMACallback`` subclasses with their original arguments.

Each class takes the original's arguments, with its names and defaults, and sets up an
:class:`~lightning_ema.EMACallback` whose EMA takes the same values, update for update (tested against plain
re-implementations of each original's rule over weights recorded from a real Trainer). Steps are optimizer
steps: without gradient accumulation they are the originals' iterations. Every other ``EMACallback`` argument
(``evaluate``, ``device``, ``nonfinite``, ...) passes through, so that from YAML::

    trainer:
      callbacks:
        - class_path: lightning_ema.compat.MMCVEMAHook
          init_args: {momentum: 0.0002, interval: 1, warm_up: 100}

For mmdet's ``MeanTeacherHook``, :func:`mean_teacher_hook_args` returns ``MeanTeacherModule`` arguments.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_ema._validate import check_bool, check_int
from lightning_ema.callback import EMACallback
from lightning_ema.schedules import ExponentialRampDecay, MomentumWarmupDecay

__all__ = ["MMCVEMAHook", "MMYOLOExpMomentumEMA", "MMagicEMAHook", "TimmModelEma", "mean_teacher_hook_args"]


def _momentum(name: str, value: Any, *, upper_inclusive: bool = False) -> float:
    """Check an OpenMMLab momentum (``1 - decay``) in ``(0, 1)`` (or ``(0, 1]``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 < float(value) < 1.0 or (upper_inclusive and float(value) == 1.0)):
        interval = "(0, 1]" if upper_inclusive else "(0, 1)"
        raise ValueError(f"`{name}` must be a float in {interval} (the momentum is 1 - decay), got {value!r}.")
    return float(value)


def _pass_through(owner: str, kwargs: dict[str, Any], fixed: tuple[str, ...]) -> dict[str, Any]:
    """Return the extra ``EMACallback`` arguments, refusing those this class derives from the original's."""
    clash = sorted(set(kwargs) & set(fixed))
    if clash:
        raise ValueError(f"`{clash[0]}` is set by {owner} from the original's arguments; got {kwargs[clash[0]]!r}.")
    return kwargs


_RULE = (
    "decay",
    "every_n_steps",
    "start_step",
    "buffers",
    "include",
    "phase",
    "count_from_start",
    "decay_per",
    "buffer_decay",
    "integer_buffers",
    "stop_step",
)


class MMCVEMAHook(EMACallback):
    """mmcv 1.x ``EMAHook``: a momentum-capped warm-up, one momentum per update, parameters only.

    After each iteration ``i`` (counted from 0; optimizer step ``t = i + 1``) with ``i % interval == 0``,
    mmcv sets ``ema = (1 - m_i) * ema + m_i * w`` on the parameters, with
    ``m_i = min(momentum ** interval, (1 + i) / (warm_up + i))``.

    Set up as ``EMACallback(MomentumWarmupDecay(momentum ** interval, warm_up), every_n_steps=interval, phase=1,
    decay_per="update", buffers="ignore")``: updates after steps 1, 1 + interval, ...; one momentum per update,
    not compounded over the interval; buffers are not averaged (evaluation uses the model's own, as mmcv's swap
    of parameters does). With the defaults the warm-up cap never binds (it starts at ``1 / warm_up``).

    Args:
        momentum: mmcv's ``momentum``, ``1 - decay``, in ``(0, 1)``.
        interval: update after every ``interval``-th iteration, from the first one on.
        warm_up: the warm-up constant of the momentum cap, ``> 0``.
        resume_from: an mmcv checkpoint (its ``ema_*`` buffers) the EMA starts from; mmcv also resumed the run
            from it, which here is ``trainer.fit(ckpt_path=...)`` with a Lightning checkpoint.
        **kwargs: other :class:`~lightning_ema.EMACallback` arguments (``evaluate``, ``device``, ...).
    """

    def __init__(
        self,
        momentum: float = 0.0002,
        interval: int = 1,
        warm_up: float = 100,
        resume_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.momentum = _momentum("momentum", momentum)
        self.interval = check_int("interval", interval, 1)
        self.warm_up = warm_up
        extra = _pass_through("MMCVEMAHook", kwargs, (*_RULE, "init_from"))
        super().__init__(
            MomentumWarmupDecay(self.momentum**self.interval, warm_up),
            every_n_steps=self.interval,
            phase=1,
            decay_per="update",
            buffers="ignore",
            init_from=resume_from,
            **extra,
        )


class MMYOLOExpMomentumEMA(EMACallback):
    """mmyolo's (and mmdet's) ``ExpMomentumEMA``, driven by mmengine's ``EMAHook``.

    Its first call copies the weights; later calls ``k = 1, 2, ...`` (one per iteration) with
    ``k % interval == 0`` update ``ema = (1 - m_k) * ema + m_k * w`` with the momentum
    ``m_k = (1 - momentum) * exp(-(1 + k) / gamma) + momentum``, once per update. Set up as
    ``EMACallback(ExponentialRampDecay(1 - momentum, gamma), start_step=max(begin_iter, 1), count_from_start=True,
    every_n_steps=interval, decay_per="update")``.

    ``update_buffers=True`` averages the floating-point buffers too; integer buffers (``num_batches_tracked``)
    keep the value of the copy (mmengine skips them). With ``update_buffers=False`` the original means to keep the
    EMA model's buffers equal to the model's, but its buffer generator is exhausted after the first call, so from
    then on they stay at their first values: this class reproduces the *intended* behaviour (``buffers="ignore"``:
    evaluation and export use the model's own buffers).

    Args:
        momentum: ``1 - decay`` approached for large steps, in ``(0, 1)``.
        gamma: the step scale of the momentum's decline, ``> 0``.
        interval: update every ``interval``-th call after the first.
        update_buffers: average the floating-point buffers too.
        begin_iter: mmengine ``EMAHook``'s ``begin_iter``: before it the EMA copies the weights at every step.
        **kwargs: other :class:`~lightning_ema.EMACallback` arguments (``evaluate``, ``device``, ...).
    """

    def __init__(
        self,
        momentum: float = 0.0002,
        gamma: float = 2000,
        interval: int = 1,
        update_buffers: bool = False,
        begin_iter: int = 0,
        **kwargs: Any,
    ) -> None:
        self.momentum = _momentum("momentum", momentum)
        self.gamma = gamma
        self.interval = check_int("interval", interval, 1)
        self.update_buffers = check_bool("update_buffers", update_buffers)
        self.begin_iter = check_int("begin_iter", begin_iter, 0)
        super().__init__(
            ExponentialRampDecay(1.0 - self.momentum, gamma),
            start_step=max(self.begin_iter, 1),
            count_from_start=True,
            every_n_steps=self.interval,
            decay_per="update",
            buffers="average" if self.update_buffers else "ignore",
            integer_buffers="keep" if self.update_buffers else "copy",
            **_pass_through("MMYOLOExpMomentumEMA", kwargs, _RULE),
        )


class TimmModelEma(EMACallback):
    """timm's ``ModelEma`` (v1): a constant decay over the whole ``state_dict``, integer buffers included.

    After every optimizer step, ``ema = decay * ema + (1 - decay) * w`` for every tensor, integer buffers
    computed in float32 and truncated back, as v1 does.

    Set up as ``EMACallback(decay, device=device, buffers="average", integer_buffers="average")``.

    Args:
        decay: the constant decay.
        device: where the EMA lives (``None`` or ``""``: with the weights; ``"cpu"`` offloads it).
        resume: a timm checkpoint (``state_dict_ema``) the EMA starts from, as v1's ``resume`` loads it.
        **kwargs: other :class:`~lightning_ema.EMACallback` arguments (``evaluate``, ``nonfinite``, ...).
    """

    def __init__(self, decay: float = 0.9999, device: str | None = None, resume: str = "", **kwargs: Any) -> None:
        extra = _pass_through("TimmModelEma", kwargs, (*_RULE, "device", "init_from"))
        super().__init__(
            decay,
            device=device or None,
            buffers="average",
            integer_buffers="average",
            init_from=resume or None,
            **extra,
        )


class MMagicEMAHook(EMACallback):
    """mmagic's ``ExponentialMovingAverageHook`` (GAN generators).

    Before iteration ``start_iter`` the EMA copies the weights at every iteration; after it, every
    ``interval``-th iteration (counted from ``start_iter``) applies ``ema = ema + (w - ema) * m`` once, with
    ``m = momentum`` for trainable tensors and ``momentum_nontrainable`` for buffers (integer buffers are
    averaged and truncated, so the default ``momentum_nontrainable=1`` copies them). Set up as
    ``EMACallback(1 - momentum, include=[X.* for each X_ema], start_step=start_iter, count_from_start=True,
    every_n_steps=interval, decay_per="update", buffer_decay=1 - momentum_nontrainable,
    integer_buffers="average")``.

    mmagic keeps the average in a ``generator_ema`` module; here the callback keeps it, validation and test run
    ``generator`` with it swapped in, and ``ema_state_dict()``/export return it under ``generator.*``. The
    original's default ``interval=-1`` never averages: the EMA stays the copy of the weights made at iteration
    ``start_iter`` (right at the start with ``start_iter=0``); this class does the same, with a warning.

    Args:
        module_keys: the EMA modules' names, each ending in ``_ema``: the average of ``X`` is ``X_ema``.
        interp_mode: only ``"lerp"`` (mmagic's only mode).
        interp_cfg: ``{"momentum": 0.001, "momentum_nontrainable": 1.0}`` or part of it.
        interval: average every ``interval`` iterations after ``start_iter``; ``<= 0`` never.
        start_iter: before this iteration the EMA copies the weights.
        **kwargs: other :class:`~lightning_ema.EMACallback` arguments (``evaluate``, ``device``, ...).
    """

    def __init__(
        self,
        module_keys: str | list[str] | tuple[str, ...],
        interp_mode: str = "lerp",
        interp_cfg: dict[str, float] | None = None,
        interval: int = -1,
        start_iter: int = 0,
        **kwargs: Any,
    ) -> None:
        keys = (module_keys,) if isinstance(module_keys, str) else tuple(module_keys)
        if not keys or not all(isinstance(key, str) and key.endswith("_ema") and len(key) > 4 for key in keys):
            raise ValueError(
                "`module_keys` must name EMA modules ending in '_ema' (the average of X is X_ema), "
                f"got {module_keys!r}."
            )
        if interp_mode != "lerp":
            raise ValueError(f"`interp_mode` must be 'lerp' (mmagic's only mode), got {interp_mode!r}.")
        config = {"momentum": 0.001, "momentum_nontrainable": 1.0}
        unknown = sorted(set(interp_cfg or {}) - set(config))
        if unknown:
            raise ValueError(f"`interp_cfg` must only set {sorted(config)}, got {interp_cfg!r}.")
        config.update(interp_cfg or {})
        momentum = _momentum("interp_cfg['momentum']", config["momentum"])
        nontrainable = _momentum(
            "interp_cfg['momentum_nontrainable']", config["momentum_nontrainable"], upper_inclusive=True
        )
        if isinstance(interval, bool) or not isinstance(interval, int):
            raise ValueError(f"`interval` must be an integer (<= 0: never average), got {interval!r}.")
        self.module_keys, self.interp_cfg, self.interval = keys, config, interval
        self.start_iter = check_int("start_iter", start_iter, 0)
        if interval <= 0:
            warnings.warn(
                f"MMagicEMAHook(interval={interval}) never averages, as in mmagic: the EMA stays the copy of the "
                f"weights made at iteration start_iter={start_iter}. Pass interval=1 to average after every iteration.",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(
            1.0 - momentum,
            include=[f"{key[: -len('_ema')]}.*" for key in keys],
            start_step=self.start_iter,
            count_from_start=True,
            every_n_steps=max(interval, 1),
            decay_per="update",
            buffer_decay=1.0 - nontrainable,
            integer_buffers="average",
            stop_step=self.start_iter if interval <= 0 else None,
            **_pass_through("MMagicEMAHook", kwargs, _RULE),
        )


def mean_teacher_hook_args(momentum: float = 0.001, interval: int = 1, skip_buffers: bool = True) -> dict[str, Any]:
    """Return the :class:`~lightning_ema.MeanTeacherModule` arguments that reproduce mmdet's ``MeanTeacherHook``.

    mmdet copies the student into the teacher when training starts at iteration 0, then after every
    ``interval``-th iteration sets ``teacher = (1 - momentum) * teacher + momentum * student`` once, on the
    parameters (``skip_buffers=True``) or on every floating-point ``state_dict`` tensor (integer buffers are left
    as they are). mmdet's constructor spells the last argument ``skip_buffer``.

    Example::

        class SemiSupervised(MeanTeacherModule):
            def __init__(self):
                super().__init__(**mean_teacher_hook_args(momentum=0.001))
                self.student = Detector()

    Raises:
        ValueError: if an argument is invalid.
    """
    skip = check_bool("skip_buffers", skip_buffers)
    return {
        "teacher_decay": 1.0 - _momentum("momentum", momentum),
        "every_n_steps": check_int("interval", interval, 1),
        "decay_per": "update",
        "buffers": "ignore" if skip else "average",
        "integer_buffers": "copy" if skip else "keep",
        "copy_student_at_start": True,
    }
