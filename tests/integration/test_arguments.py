"""Every invalid EMACallback argument raises a ValueError that names the argument and the value."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from support import TinyClassifier

from lightning_ema import EMACallback

BAD_ARGUMENTS = [
    ("decay", 1.0),
    ("decay", -0.5),
    ("decay", float("nan")),
    ("decay", "0.99"),
    ("decay", True),
    ("decay", None),
    ("every_n_steps", 0),
    ("every_n_steps", 2.0),
    ("every_n_steps", True),
    ("start_step", -1),
    ("start_step", "10"),
    ("device", "gpu0"),
    ("device", 3.5),
    ("dtype", "int8"),
    ("dtype", torch.int64),
    ("dtype", "float128"),
    ("buffers", "mean"),
    ("buffers", None),
    ("include", []),
    ("include", [""]),
    ("include", [1]),
    ("exclude", 5),
    ("evaluate", "both_please"),
    ("evaluate", None),
    ("apply_at_end", "yes"),
    ("nonfinite", "warn"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ARGUMENTS])
def test_bad_argument_names_argument_and_value(name: str, value: object) -> None:
    kwargs = {name: value}
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")) as info:
        EMACallback(**kwargs)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dtype", "float32"),
        ("dtype", "torch.bfloat16"),
        ("dtype", torch.float64),
        ("device", "cpu"),
        ("include", "net.*"),
    ],
)
def test_good_spellings_are_accepted(name: str, value: object) -> None:
    EMACallback(**{name: value})  # type: ignore[arg-type]


def test_reading_the_ema_before_it_exists_says_when_it_will() -> None:
    callback = EMACallback()
    with pytest.raises(RuntimeError, match="created when"):
        callback.ema_state_dict()
    with pytest.raises(RuntimeError, match="created when"), callback.swapped(TinyClassifier()):
        pass


def test_include_that_selects_nothing_fails_when_training_starts() -> None:
    from lightning_ema import EMAStateError

    callback = EMACallback(include=["generator.*"])
    trainer = L.Trainer(callbacks=[callback], max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    from support import make_loader

    with pytest.raises(EMAStateError, match="include"):
        trainer.fit(TinyClassifier(), make_loader())


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_untestable_sharding_strategies_are_refused_with_the_alternative(strategy_name: str) -> None:
    import types

    from lightning.pytorch import strategies

    # Neither strategy runs on CPU, so the Trainer is a stand-in holding an instance of the real class.
    strategy_class = getattr(strategies, strategy_name)
    strategy = strategy_class.__new__(strategy_class)
    callback = EMACallback()
    trainer = types.SimpleNamespace(strategy=strategy, callbacks=[callback])
    with pytest.raises(ValueError, match=rf"strategy={strategy_name}.*ModelParallelStrategy.*DDP"):
        callback.setup(trainer, TinyClassifier(), "fit")  # type: ignore[arg-type]
