"""Getting the EMA out of a Lightning checkpoint: ``load_ema_state_dict`` and ``python -m lightning_ema`` (§4).

Checkpoints come from real ``Trainer.fit`` runs on CPU; expected values are read straight from the
checkpoint file (its raw ``state_dict`` and the callback's saved ``ema``), and the command line runs in
real subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from support import TinyClassifier, load, make_loader, trainer_kwargs
from torch import Tensor

from lightning_ema import EMACallback, load_ema_state_dict

EXCLUDED = ("net.3.weight", "net.3.bias")  # EMACallback(exclude=["net.3.*"]) leaves these untracked


@dataclass
class Checkpoints:
    single: Path  # one EMACallback(decay=0.9, exclude=["net.3.*"])
    single_key: str
    double: Path  # that one plus EMACallback(decay=0.99, evaluate="raw")
    double_keys: tuple[str, str]
    plain: Path  # no EMACallback


def fit_and_save(path: Path, callbacks: list[L.Callback]) -> None:
    trainer = L.Trainer(callbacks=callbacks, max_epochs=2, **trainer_kwargs())
    trainer.fit(TinyClassifier(), make_loader())
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    directory = tmp_path_factory.mktemp("export")
    single = EMACallback(decay=0.9, exclude=["net.3.*"])
    fit_and_save(directory / "single.ckpt", [single])
    first, second = EMACallback(decay=0.9, exclude=["net.3.*"]), EMACallback(decay=0.99, evaluate="raw")
    fit_and_save(directory / "double.ckpt", [first, second])
    plain = directory / "plain" / "plain.ckpt"
    saver = ModelCheckpoint(dirpath=directory / "plain", filename="plain")
    trainer = L.Trainer(callbacks=[saver], max_epochs=1, **trainer_kwargs(enable_checkpointing=True))
    trainer.fit(TinyClassifier(), make_loader())
    assert plain.is_file()
    return Checkpoints(
        single=directory / "single.ckpt",
        single_key=single.state_key,
        double=directory / "double.ckpt",
        double_keys=(first.state_key, second.state_key),
        plain=plain,
    )


def expected_weights(checkpoint: dict, state_key: str) -> dict[str, Tensor]:
    """The checkpoint's raw state_dict with the saved EMA of ``state_key`` put over it (built here, by hand)."""
    weights = {name: tensor.clone() for name, tensor in checkpoint["state_dict"].items()}
    for name, tensor in checkpoint["callbacks"][state_key]["emas"][0].items():
        weights[name] = tensor.clone()
    return weights


def assert_same_tensors(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), f"{name} differs"


def outputs(weights: dict[str, Tensor]) -> Tensor:
    model = TinyClassifier()
    model.load_state_dict(weights, strict=True)
    model.eval()
    with torch.no_grad():
        return model(make_data_batch())


def make_data_batch() -> Tensor:
    x, _ = next(iter(make_loader(n=16, batch_size=16, seed=1)))
    return x


# ---------------------------------------------------------------------------------------------- the function
def test_load_ema_state_dict_is_complete_and_loads_strictly(checkpoints: Checkpoints) -> None:
    checkpoint = load(checkpoints.single)
    saved_ema = checkpoint["callbacks"][checkpoints.single_key]["emas"][0]
    assert not set(EXCLUDED) & set(saved_ema)  # the excluded tensors are really untracked...
    assert set(EXCLUDED) <= set(checkpoint["state_dict"])  # ...but are in the raw weights

    weights = load_ema_state_dict(checkpoints.single)
    assert set(weights) == set(checkpoint["state_dict"])
    for name, tensor in weights.items():
        source = saved_ema if name in saved_ema else checkpoint["state_dict"]
        assert torch.equal(tensor, source[name]), name
    # the EMA is visibly not the raw weights
    assert not torch.allclose(weights["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])

    model = TinyClassifier()
    model.load_state_dict(weights, strict=True)
    assert torch.equal(model.net[0].weight, saved_ema["net.0.weight"])
    assert torch.equal(model.net[3].weight, checkpoint["state_dict"]["net.3.weight"])

    # an already-loaded checkpoint works the same
    assert_same_tensors(load_ema_state_dict(checkpoint), weights)


def test_load_ema_state_dict_prefix(checkpoints: Checkpoints) -> None:
    checkpoint = load(checkpoints.single)
    weights = load_ema_state_dict(checkpoints.single, prefix="net.")
    expected = {name[len("net.") :]: t for name, t in expected_weights(checkpoint, checkpoints.single_key).items()}
    assert_same_tensors(weights, expected)
    model = TinyClassifier()
    model.net.load_state_dict(weights, strict=True)
    with pytest.raises(ValueError, match="prefix"):
        load_ema_state_dict(checkpoints.single, prefix="generator.")


def test_load_ema_state_dict_chooses_among_several(checkpoints: Checkpoints) -> None:
    checkpoint = load(checkpoints.double)
    first, second = checkpoints.double_keys
    assert first != second

    with pytest.raises(ValueError) as error:
        load_ema_state_dict(checkpoints.double)
    assert first in str(error.value) and second in str(error.value)

    for key in (first, second):
        weights = load_ema_state_dict(checkpoints.double, state_key=key)
        assert_same_tensors(weights, expected_weights(checkpoint, key))
    assert not torch.equal(
        load_ema_state_dict(checkpoint, state_key=first)["net.0.weight"],
        load_ema_state_dict(checkpoint, state_key=second)["net.0.weight"],
    )
    with pytest.raises(ValueError, match="state_key"):
        load_ema_state_dict(checkpoints.double, state_key="EMACallback{'decay': 'nonsense'}")


def test_load_ema_state_dict_without_ema_state(checkpoints: Checkpoints) -> None:
    with pytest.raises(ValueError, match="no EMA"):
        load_ema_state_dict(checkpoints.plain)
    with pytest.raises(ValueError, match="no EMA"):
        load_ema_state_dict(load(checkpoints.plain))


# ---------------------------------------------------------------------------------------------- command line
@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli(checkpoints: Checkpoints, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Run], Path]:
    """Run each command line case once, as concurrent subprocesses.

    Each process imports torch and lightning (seconds of CPU), so the cases are few and options are combined.
    """
    out = tmp_path_factory.mktemp("cli")
    second = checkpoints.double_keys[1]
    commands = {
        "export-pt": ["export", str(checkpoints.single), str(out / "single.pt")],
        "safetensors-state-key-prefix": [
            "export",
            str(checkpoints.double),
            str(out / "second-net.safetensors"),
            "--state-key",
            second,
            "--prefix",
            "net.",
        ],
        "list": ["list", str(checkpoints.double)],
        "missing": ["export", str(out / "does-not-exist.ckpt"), str(out / "missing.pt")],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lightning_ema", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    runs = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=240)
            runs[name] = Run(process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return runs, out


def test_cli_export_torch_file_loads_strictly_and_predicts_like_the_ema(cli, checkpoints: Checkpoints) -> None:
    runs, out = cli
    run = runs["export-pt"]
    assert run.returncode == 0, run.stderr
    exported = torch.load(out / "single.pt", weights_only=True)
    expected = expected_weights(load(checkpoints.single), checkpoints.single_key)
    assert_same_tensors(exported, expected)
    assert torch.equal(outputs(exported), outputs(expected))
    # and that is not what the raw weights predict
    assert not torch.equal(outputs(exported), outputs(load(checkpoints.single)["state_dict"]))


def test_cli_export_safetensors_with_state_key_and_prefix(cli, checkpoints: Checkpoints) -> None:
    runs, out = cli
    run = runs["safetensors-state-key-prefix"]
    assert run.returncode == 0, run.stderr
    exported = load_file(str(out / "second-net.safetensors"))
    expected = expected_weights(load(checkpoints.double), checkpoints.double_keys[1])
    assert_same_tensors(exported, {name[len("net.") :]: t for name, t in expected.items()})

    model = TinyClassifier()
    model.net.load_state_dict(exported, strict=True)
    model.eval()
    with torch.no_grad():
        got = model(make_data_batch())
    assert torch.equal(got, outputs(expected))
    # the second EMA (decay 0.99) was exported, not the first one
    assert not torch.equal(got, outputs(expected_weights(load(checkpoints.double), checkpoints.double_keys[0])))


def test_cli_list(cli, checkpoints: Checkpoints) -> None:
    runs, _ = cli
    run = runs["list"]
    assert run.returncode == 0, run.stderr
    for key in checkpoints.double_keys:
        assert key in run.stdout


def test_cli_missing_checkpoint(cli) -> None:
    runs, out = cli
    run = runs["missing"]
    assert run.returncode == 2
    assert str(out / "does-not-exist.ckpt") in run.stderr
    assert "Traceback" not in run.stderr
    assert not (out / "missing.pt").exists()
