"""``EMA`` in a plain PyTorch loop and a Lightning Fabric loop gives the EMA ``EMACallback`` gives, bit for bit.

One trajectory (TinyClassifier, the same seeds, data order and SGD with momentum) is trained three ways: by a
real Trainer with the callback, by a hand-written loop, and by a single-process Fabric loop. The raw weights must
agree bit for bit, and so must the EMAs; the callback's is also checked against the float64 reference of the
recorded weights. Fabric's ``save``/``load`` and a Lightning checkpoint continued in Fabric resume bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import (
    TinyClassifier,
    WeightRecorder,
    assert_close_to_reference,
    load,
    make_loader,
    reference_ema,
    snapshot,
    trainer_kwargs,
    warmup_decay,
)
from torch import Tensor, nn

from lightning_ema import EMA, EMACallback
from lightning_ema.schedules import WarmupDecay

OPTIONS: dict[str, Any] = {"every_n_steps": 2, "start_step": 3}
EPOCHS = 2
STEPS_PER_EPOCH = 8  # 64 samples, batch 8


def decay() -> WarmupDecay:
    return WarmupDecay(0.9, 5)


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # TinyClassifier.configure_optimizers


def assert_identical(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The trajectory through a real Trainer with EMACallback; a checkpoint after each epoch."""
    out = tmp_path_factory.mktemp("trainer")
    recorder = WeightRecorder()
    callback = EMACallback(decay(), **OPTIONS)
    checkpoints = ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = L.Trainer(
        callbacks=[recorder, callback, checkpoints],
        max_epochs=EPOCHS,
        **trainer_kwargs(enable_checkpointing=True),
    )
    model = TinyClassifier()
    trainer.fit(model, make_loader())
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    return {
        "ema": {name: t.clone() for name, t in callback.ema_state_dict().items()},
        "num_updates": callback.num_updates,
        "raw": snapshot(model),
        "recorder": recorder,
        "first_epoch": out / "epoch=0.ckpt",
        "state_key": callback.state_key,
    }


def test_the_callbacks_ema_is_the_float64_reference_of_its_trajectory(trainer_run: dict[str, Any]) -> None:
    recorder = trainer_run["recorder"]
    expected = reference_ema(recorder.initial, recorder.steps, recorder.states, warmup_decay(0.9, 5), **OPTIONS)
    assert_close_to_reference(trainer_run["ema"], expected)


def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, epochs: range, step: int = 0) -> int:
    """The training loop a PyTorch user writes; returns the optimizer steps done."""
    model.train()
    for _ in epochs:
        for x, y in make_loader():
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            ema.update(step)
    return step


def test_plain_pytorch_loop_gives_the_callbacks_ema_bit_for_bit(trainer_run: dict[str, Any]) -> None:
    model = TinyClassifier()
    ema = EMA(model, decay(), **OPTIONS)
    plain_loop(model, optimizer_for(model), ema, range(EPOCHS))
    assert_identical(snapshot(model), trainer_run["raw"])  # the same trajectory
    assert ema.num_updates == trainer_run["num_updates"] == EPOCHS * STEPS_PER_EPOCH // 2
    assert_identical(ema.ema_state_dict(), trainer_run["ema"])


def fabric_loop(fabric: L.Fabric, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, epochs: range) -> None:
    """The Fabric loop of the README: ``fabric.backward``, ``ema.update()`` counting optimizer steps."""
    loader = fabric.setup_dataloaders(make_loader())
    model.train()
    for _ in epochs:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            ema.update()


def fabric_setup(ema_of: str = "wrapper") -> tuple[L.Fabric, nn.Module, torch.optim.Optimizer, EMA]:
    fabric = L.Fabric(accelerator="cpu", devices=1)
    raw = TinyClassifier()
    model, optimizer = fabric.setup(raw, optimizer_for(raw))
    ema = EMA(model if ema_of == "wrapper" else raw, decay(), **OPTIONS)
    return fabric, model, optimizer, ema


@pytest.mark.parametrize("ema_of", ["wrapper", "module"])
def test_fabric_loop_gives_the_callbacks_ema_bit_for_bit(trainer_run: dict[str, Any], ema_of: str) -> None:
    """The EMA of what ``fabric.setup`` returns and of the module it wraps are the same, under the same names."""
    fabric, model, optimizer, ema = fabric_setup(ema_of)
    fabric_loop(fabric, model, optimizer, ema, range(EPOCHS))
    assert_identical(snapshot(model), trainer_run["raw"])
    assert ema.num_updates == trainer_run["num_updates"] and ema.step == EPOCHS * STEPS_PER_EPOCH
    assert_identical(ema.ema_state_dict(), trainer_run["ema"])
    # evaluation with the EMA, through the wrapper, and the raw weights back afterwards
    x, _ = next(iter(make_loader()))
    model.eval()
    with ema.swapped():
        assert_identical(snapshot(model), trainer_run["ema"])
        with torch.no_grad():
            swapped_out = model(x)
    reference = TinyClassifier().eval()
    reference.load_state_dict(trainer_run["ema"])
    with torch.no_grad():
        assert torch.equal(swapped_out, reference(x))
    assert_identical(snapshot(model), trainer_run["raw"])


def test_fabric_save_and_load_resume_the_ema_bit_for_bit(trainer_run: dict[str, Any], tmp_path: Path) -> None:
    fabric, model, optimizer, ema = fabric_setup()
    fabric_loop(fabric, model, optimizer, ema, range(1))
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "ema": ema, "epoch": 1})

    saved = load(path)  # Fabric called ema.state_dict(): plain values and tensors, weights_only-loadable
    assert saved["ema"]["num_updates"] == STEPS_PER_EPOCH // 2 and saved["ema"]["step"] == STEPS_PER_EPOCH
    assert_identical(saved["ema"]["emas"][0], ema.ema_state_dict())

    fabric, model, optimizer, ema = fabric_setup()  # a new run, as after a restart
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "ema": ema, "epoch": 0}
    remainder = fabric.load(path, state)  # Fabric calls ema.load_state_dict(...)
    assert remainder == {} and state["ema"] is ema and state["epoch"] == 1
    assert ema.step == STEPS_PER_EPOCH and ema.num_updates == STEPS_PER_EPOCH // 2
    fabric_loop(fabric, model, optimizer, ema, range(state["epoch"], EPOCHS))
    assert_identical(snapshot(model), trainer_run["raw"])
    assert_identical(ema.ema_state_dict(), trainer_run["ema"])


def test_a_lightning_checkpoint_continues_in_a_fabric_loop_bit_for_bit(trainer_run: dict[str, Any]) -> None:
    """The callback's checkpoint state is an ``EMA`` state: a Trainer run can move to Fabric and go on exactly."""
    checkpoint = load(trainer_run["first_epoch"])
    fabric, model, optimizer, ema = fabric_setup()
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    ema.load_state_dict(checkpoint["callbacks"][trainer_run["state_key"]])
    assert ema.step == checkpoint["global_step"] == STEPS_PER_EPOCH
    fabric_loop(fabric, model, optimizer, ema, range(1, EPOCHS))
    assert_identical(ema.ema_state_dict(), trainer_run["ema"])


def test_names_as_the_fabric_wrapper_shows_them_pair_with_the_module() -> None:
    """``named_parameters()`` of a Fabric module carries ``_forward_module.``; an EMA state under such names loads."""
    fabric, model, optimizer, ema = fabric_setup()
    fabric_loop(fabric, model, optimizer, ema, range(1))
    assert next(name for name, _ in model.named_parameters()) == "_forward_module.net.0.weight"
    prefixed = {f"_forward_module.{name}": t.clone() for name, t in ema.ema_state_dict().items()}
    _, other_model, _, other = fabric_setup()
    other.load_state_dict({"num_updates": 1, "last_update_step": 8, "emas": [prefixed]})
    assert_identical(other.ema_state_dict(), ema.ema_state_dict())
    # and the EMA goes into the plain module or a wrapper by canonical names
    plain = TinyClassifier()
    other.copy_to(plain)
    assert_identical({n: plain.state_dict()[n] for n in ema.ema_state_dict()}, ema.ema_state_dict())
    other.copy_to(other_model)
    assert_identical({n: other_model.state_dict()[n] for n in ema.ema_state_dict()}, ema.ema_state_dict())
