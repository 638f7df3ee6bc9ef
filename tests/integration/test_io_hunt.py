"""Defects found reading other libraries' files and post-hoc snapshots, each pinned by a test.

- A timm checkpoint whose name ends in ``-EMA`` (or a NeMo main checkpoint saved outside NeMo's ``ModelCheckpoint``)
  was read as NeMo's ``X-EMA.ckpt``: its ``state_dict``, the raw weights, came back as the EMA.
- A damaged ``.safetensors`` snapshot raised safetensors' own error, and the command line printed a traceback.
- A plain pickle file made the command line print torch's warning besides its one ``error:`` line.

The layouts are written after each library's source: timm's ``CheckpointSaver`` (``state_dict`` raw,
``state_dict_ema`` the EMA), NeMo's ``EMAOptimizer.state_dict`` (``{"opt", "ema", "current_step", "decay",
"every_n_steps"}`` per optimizer; the EMA file written with the EMA swapped in, so its ``"ema"`` lists are the
model's own parameters).
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from support import TinyClassifier, make_loader, trainer_kwargs
from torch import Tensor

from lightning_ema import load_ema_state_dict
from lightning_ema.formats import detect_format
from lightning_ema.posthoc import synthesize, write_snapshot
from lightning_ema.schedules import KarrasDecay


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_ema", *args], capture_output=True, text=True)


def weights(offset: float) -> dict[str, Tensor]:
    return {"fc.weight": torch.full((2, 3), offset), "fc.bias": torch.full((2,), offset), "n": torch.tensor(4)}


@pytest.mark.parametrize("name", ["checkpoint-EMA.pth", "run-EMA.ckpt"])
def test_a_timm_checkpoint_named_like_nemos_ema_file_gives_its_ema(tmp_path: Path, name: str) -> None:
    raw, ema = weights(1.0), weights(2.0)
    path = tmp_path / name
    torch.save(
        {"epoch": 3, "state_dict": raw, "state_dict_ema": ema, "args": argparse.Namespace(model="x"), "version": 2},
        path,
    )
    loaded = torch.load(path, weights_only=False)
    assert detect_format(loaded, path) == "timm"
    result = load_ema_state_dict(path)
    assert result.keys() == ema.keys()
    for key, tensor in ema.items():
        assert torch.equal(result[key], tensor), key


def nemo_checkpoints(tmp_path: Path) -> tuple[Path, Path, dict[str, Tensor], dict[str, Tensor]]:
    """A real Lightning checkpoint turned into NeMo's two files; returns (main file, EMA file, raw, EMA)."""
    model = TinyClassifier()
    trainer = L.Trainer(max_steps=3, **trainer_kwargs())
    trainer.fit(model, make_loader(64, 8))
    trainer.save_checkpoint(tmp_path / "base.ckpt")
    base = torch.load(tmp_path / "base.ckpt", weights_only=True)
    raw = dict(base["state_dict"])
    parameters = [name for name, _ in model.named_parameters()]
    ema = {name: t + 0.5 if name in parameters else t.clone() for name, t in raw.items()}
    optimizer = base["optimizer_states"][0]

    def nemo_optimizer(averages: list[Tensor]) -> dict[str, object]:
        return {"opt": optimizer, "ema": averages, "current_step": 3, "decay": 0.9, "every_n_steps": 1}

    # saved by trainer.save_checkpoint (not NeMo's ModelCheckpoint): raw weights, the EMA in the optimizer only
    main = tmp_path / "main.ckpt"
    torch.save({**base, "optimizer_states": [nemo_optimizer([ema[n] for n in parameters])]}, main)
    # NeMo's X-EMA.ckpt: the EMA swapped into the model, so the "ema" lists are the state_dict's own parameters
    ema_file = tmp_path / "other-EMA.ckpt"
    state = {**base, "state_dict": ema, "optimizer_states": [nemo_optimizer([ema[n] for n in parameters])]}
    torch.save(state, ema_file)
    return main, ema_file, raw, ema


def test_a_nemo_checkpoint_whose_state_dict_is_raw_is_refused_not_read_as_the_ema(tmp_path: Path) -> None:
    main, ema_file, raw, ema = nemo_checkpoints(tmp_path)
    with pytest.raises(ValueError, match=r"raw weights.*-EMA\.ckpt"):
        load_ema_state_dict(main)
    run = cli("export", str(main), str(tmp_path / "out.pt"))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    assert not (tmp_path / "out.pt").exists()
    # NeMo's own EMA file still reads, given by path or loaded
    for source in (ema_file, torch.load(ema_file, weights_only=True)):
        result = load_ema_state_dict(source)
        for key, tensor in ema.items():
            assert torch.equal(result[key], tensor), key
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_a_damaged_safetensors_snapshot_is_a_value_error_and_one_line_on_the_command_line(tmp_path: Path) -> None:
    gammas = [KarrasDecay(sigma_rel=s).gamma for s in (0.05, 0.10)]
    for step in (10, 20):
        emas = [{"w": torch.full((3,), float(step))}, {"w": torch.ones(3)}]
        write_snapshot(
            tmp_path / f"step-{step:010d}.safetensors", step=step, sigma_rels=(0.05, 0.10), gammas=gammas, emas=emas
        )
    damaged = tmp_path / "step-0000000020.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"step-0000000020\.safetensors"):
        synthesize(tmp_path, 0.07)
    damaged.write_bytes(b"")
    run = cli("posthoc", str(tmp_path), "--sigma-rel", "0.07", str(tmp_path / "out.pt"))
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "step-0000000020.safetensors" in run.stderr


@pytest.mark.parametrize("command", ["export", "list"])
def test_a_plain_pickle_gets_one_error_line(tmp_path: Path, command: str) -> None:
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as stream:
        pickle.dump({"w": [1.0, 2.0]}, stream, protocol=4)
    args = [command, str(path)] + ([str(tmp_path / "out.pt")] if command == "export" else [])
    run = cli(*args)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    # weights_only=False would not help (torch.load cannot read a plain pickle at all): it must not be advised
    assert "plain pickle" in run.stderr and "weights_only=False" not in run.stderr, run.stderr


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_plain_pickle_is_named_as_such_and_a_legacy_torch_file_still_loads(tmp_path: Path, protocol: int) -> None:
    from lightning_ema._files import load_file

    path = tmp_path / "weights.pkl"
    with open(path, "wb") as stream:
        pickle.dump({"w": [1.0, 2.0]}, stream, protocol=protocol)
    with pytest.raises(ValueError, match="plain pickle"):
        load_file(path, weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(legacy, weights_only=True)["w"], torch.ones(2))


def test_list_names_the_other_librarys_ema_it_finds(tmp_path: Path) -> None:
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": weights(1.0), "state_dict_ema": weights(2.0)}, path)
    run = cli("list", str(path))
    assert run.returncode == 1
    assert run.stderr.startswith("no EMA state in this checkpoint") and "timm EMA" in run.stderr, run.stderr
