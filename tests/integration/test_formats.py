"""Other libraries' EMA checkpoints: every layout is read, forced, resumed from, exported, and refused when it
carries a pickle that would run code (issue 11).

The checkpoints are synthetic: plain tensors in each library's layout (written after its source code), saved
with ``torch.save``; the Lightning ``EMAWeightAveraging`` one is also written by a real Trainer.
"""

from __future__ import annotations

import argparse
import builtins
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from support import make_loader, snapshot, trainer_kwargs
from torch import Tensor, nn

from lightning_ema import EMACallback, load_ema_state_dict
from lightning_ema.__main__ import main
from lightning_ema.checkpoint import export_ema
from lightning_ema.formats import FOREIGN_FORMATS, detect_format

POSITIONAL = ("diffusers", "torch-ema")


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


class Wrapped(L.LightningModule):
    """A LightningModule around the bare model: its names are the bare model's with ``net.`` in front."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


RAW = make_net().state_dict()
PARAMETERS = [name for name, _ in make_net().named_parameters()]
#: The EMA every synthetic checkpoint holds: the raw weights moved, a distinct integer count.
EMA = {k: (v + 0.25 * (i + 1) if v.is_floating_point() else v + 3) for i, (k, v) in enumerate(RAW.items())}


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + name: tensor.clone() for name, tensor in state.items()}


def _params(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: state[name] for name in PARAMETERS}


def build(layout: str, directory: Path, extra: dict[str, Any] | None = None) -> tuple[Path, dict[str, Tensor]]:
    """Write a checkpoint of ``layout``; return its path and the EMA ``load_ema_state_dict`` must return.

    ``extra`` entries are added to the file that holds the EMA (NeMo: the ``-EMA`` file).
    """
    extra = extra or {}
    path = directory / f"{layout}.ckpt"
    if layout == "lightning":
        checkpoint = {
            "epoch": 0,
            "global_step": 5,
            "state_dict": _prefixed("net.", EMA),
            "current_model_state": _prefixed("net.", RAW),
            "averaging_state": {"n_averaged": torch.tensor(5)},
            "callbacks": {"EMAWeightAveraging": {"latest_update_step": 4}},
        }
        expected = _prefixed("net.", EMA)
    elif layout == "nemo":
        torch.save({"global_step": 5, "state_dict": _prefixed("net.", RAW)}, path)
        ema_file = directory / "nemo-EMA.ckpt"
        optimizer = {"opt": {}, "ema": list(_params(EMA).values()), "current_step": 5, "decay": 0.999}
        torch.save(
            {"global_step": 5, "state_dict": _prefixed("net.", EMA), "optimizer_states": [optimizer], **extra}, ema_file
        )
        return path, _prefixed("net.", EMA)
    elif layout == "timm":
        checkpoint = {
            "epoch": 3,
            "arch": "tiny",
            "state_dict": _prefixed("", RAW),
            "state_dict_ema": _prefixed("module.", EMA),
            "args": argparse.Namespace(lr=0.1, model="tiny"),  # what timm's train.py saves
        }
        expected = _prefixed("", EMA)
    elif layout == "mmengine":
        checkpoint = {
            "meta": {"iter": 5, "epoch": 1, "mmengine_version": "0.10"},
            "state_dict": _prefixed("", EMA),
            "ema_state_dict": {"steps": torch.tensor(5), **_prefixed("module.", RAW)},
        }
        expected = _prefixed("", EMA)
    elif layout == "mean-teacher":
        checkpoint = {"meta": {"iter": 5}, "state_dict": {**_prefixed("teacher.", EMA), **_prefixed("student.", RAW)}}
        expected = _prefixed("", EMA)
    elif layout == "mmagic":
        discriminator = {"discriminator.weight": torch.ones(2, 2)}
        averaged = {**_prefixed("generator_ema.module.", EMA), "generator_ema.steps": torch.tensor(5)}
        checkpoint = {"meta": {"iter": 5}, "state_dict": {**_prefixed("generator.", RAW), **averaged, **discriminator}}
        expected = {**_prefixed("generator.", EMA), **discriminator}
    elif layout == "mmcv":
        buffers = {f"ema_{name.replace('.', '_')}": EMA[name].clone() for name in PARAMETERS}
        checkpoint = {"meta": {"iter": 5, "epoch": 1}, "state_dict": {**_prefixed("", RAW), **buffers}}
        expected = {name: (EMA[name] if name in PARAMETERS else RAW[name]) for name in RAW}
    elif layout == "ema-pytorch":
        checkpoint = {"initted": torch.tensor(True), "step": torch.tensor(5), **_prefixed("ema_model.", EMA)}
        checkpoint.update(_prefixed("online_model.", RAW))
        expected = _prefixed("", EMA)
    elif layout == "diffusers":
        checkpoint = {
            "decay": 0.9999,
            "min_decay": 0.0,
            "optimization_step": 5,
            "update_after_step": 0,
            "use_ema_warmup": False,
            "inv_gamma": 1.0,
            "power": 2 / 3,
            "shadow_params": [t.clone() for t in _params(EMA).values()],
        }
        expected = _params(EMA)
    elif layout == "torch-ema":
        checkpoint = {
            "decay": 0.999,
            "num_updates": 5,
            "shadow_params": [t.clone() for t in _params(EMA).values()],
            "collected_params": None,
        }
        expected = _params(EMA)
    else:
        raise AssertionError(layout)
    torch.save({**checkpoint, **extra}, path)
    return path, expected


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


# ------------------------------------------------------------------------------------------------------- read
@pytest.mark.parametrize("layout", FOREIGN_FORMATS)
def test_every_layout_is_recognised_and_read(layout: str, tmp_path: Path) -> None:
    path, expected = build(layout, tmp_path)
    module = make_net() if layout in POSITIONAL else None
    assert_same(load_ema_state_dict(path, module=module), expected)
    assert_same(load_ema_state_dict(path, format=layout, module=module), expected)
    if layout != "nemo":  # NeMo's EMA is found through the file's path
        assert detect_format(torch.load(path, weights_only=False)) == layout


@pytest.mark.parametrize("layout", POSITIONAL)
def test_positional_layouts_need_the_module_and_say_so(layout: str, tmp_path: Path) -> None:
    path, _ = build(layout, tmp_path)
    with pytest.raises(ValueError, match="without names: it can only be read with the module"):
        load_ema_state_dict(path)
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="holds 6 averages but `module` has 4 parameters"):
        load_ema_state_dict(path, module=other)


def test_forcing_a_layout_the_file_does_not_have_names_what_is_missing(tmp_path: Path) -> None:
    path, _ = build("timm", tmp_path)
    with pytest.raises(ValueError, match="mmcv EMAHook checkpoint must hold `ema_<name>` buffers"):
        load_ema_state_dict(path, format="mmcv")
    with pytest.raises(ValueError, match="`format` must be None, 'lightning-ema' or one of"):
        load_ema_state_dict(path, format="keras")
    torch.save({"state_dict": _prefixed("", RAW)}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="holds no EMA in a layout lightning-ema reads"):
        load_ema_state_dict(tmp_path / "plain.ckpt")


# ----------------------------------------------------------------------------------------------- resume from
class StartRecorder(L.Callback):
    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.start: dict[str, Tensor] = {}
        self.weights_at_start: dict[str, Tensor] = {}
        self.raw: list[dict[str, Tensor]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {name: t.clone() for name, t in self.ema.ema_state_dict().items()}
        self.weights_at_start = snapshot(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.raw.append(snapshot(pl_module))


@pytest.mark.parametrize("layout", FOREIGN_FORMATS)
def test_ema_callback_starts_from_every_layout_and_continues(layout: str, tmp_path: Path) -> None:
    path, expected = build(layout, tmp_path)
    if layout == "mmagic":  # its EMA is of `generator`: the module here is `net`
        expected = _prefixed("", EMA)
        state = torch.load(path, weights_only=True)
        state["state_dict"] = {k.replace("generator", "net"): v for k, v in state["state_dict"].items()}
        torch.save(state, path)
    callback = EMACallback(decay=0.5, init_from=path)
    recorder = StartRecorder(callback)
    trainer = L.Trainer(max_steps=2, callbacks=[callback, recorder], **trainer_kwargs())
    trainer.fit(Wrapped(), make_loader())
    canonical = {name.removeprefix("net."): tensor for name, tensor in recorder.start.items()}
    for name, tensor in canonical.items():
        if name in expected or "net." + name in expected:
            want = expected.get(name, expected.get("net." + name))
        else:  # buffers a parameters-only layout lacks start from the weights
            assert layout in POSITIONAL and name not in PARAMETERS
            want = recorder.weights_at_start["net." + name]
        assert torch.equal(tensor, want), name
    # and it continues: two updates with decay 0.5 from there
    final = callback.ema_state_dict()
    for name in ("net.0.weight", "net.3.bias"):
        ema = recorder.start[name].double()
        for raw in recorder.raw:
            ema = 0.5 * ema + 0.5 * raw[name].double()
        torch.testing.assert_close(final[name].double(), ema, rtol=0, atol=1e-6)
    assert callback.num_updates == 2


def test_init_from_is_checked_and_a_mismatch_names_the_missing_tensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`init_from` must be None, a checkpoint or state dict, or the path"):
        EMACallback(init_from=tmp_path / "missing.ckpt")
    callback = EMACallback(decay=0.5, init_from={"something.else": torch.zeros(3)})
    trainer = L.Trainer(max_steps=1, callbacks=[callback], **trainer_kwargs())
    with pytest.raises(ValueError, match=r"The EMA to start from lacks \['net.0.bias'"):
        trainer.fit(Wrapped(), make_loader())


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("layout", FOREIGN_FORMATS)
def test_export_accepts_every_layout(layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, expected = build(layout, tmp_path)
    out = tmp_path / "out.pt"
    if layout in POSITIONAL:
        assert main(["export", str(path), str(out)]) == 2
        assert "only be read with the module" in capsys.readouterr().err
        export_ema(path, out, module=make_net())
    else:
        assert main(["export", str(path), str(out), "--format", layout]) == 0
    assert_same(torch.load(out, weights_only=True), expected)


def test_export_to_timm_and_diffusers_layouts(tmp_path: Path) -> None:
    callback = EMACallback(decay=0.5)
    trainer = L.Trainer(max_steps=3, callbacks=[callback], **trainer_kwargs(default_root_dir=tmp_path))
    trainer.fit(Wrapped(), make_loader())
    trainer.save_checkpoint(tmp_path / "ours.ckpt")
    ema = {name.removeprefix("net."): tensor for name, tensor in callback.ema_state_dict().items()}

    assert (
        main(["export", str(tmp_path / "ours.ckpt"), str(tmp_path / "timm.pth"), "--to", "timm", "--prefix", "net."])
        == 0
    )
    timm = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert sorted(timm) == ["state_dict", "state_dict_ema"]
    assert_same(timm["state_dict_ema"], ema)
    assert_same(load_ema_state_dict(tmp_path / "timm.pth"), ema)  # and it reads back as timm's layout

    target = tmp_path / "diffusers.pt"
    assert main(["export", str(tmp_path / "ours.ckpt"), str(target), "--to", "diffusers", "--prefix", "net."]) == 0
    diffusers = torch.load(target, weights_only=True)
    assert diffusers["optimization_step"] == 3
    model = make_net()  # diffusers pairs shadow_params with model.parameters() by position
    assert len(diffusers["shadow_params"]) == len(list(model.parameters()))
    for (name, _), shadow in zip(model.named_parameters(), diffusers["shadow_params"], strict=True):
        assert torch.equal(shadow, ema[name]), name
    assert_same(load_ema_state_dict(target, module=model), {name: ema[name] for name in PARAMETERS})


# --------------------------------------------------------------------------------------------- malicious pickles
def test_the_payload_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path, _ = build("timm", tmp_path, {"meta": Payload(marker)})
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("layout", FOREIGN_FORMATS)
def test_a_malicious_pickle_in_any_layout_is_refused(layout: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path, _ = build(layout, tmp_path, {"meta": Payload(marker)})
    module = make_net() if layout in POSITIONAL else None
    with pytest.raises(ValueError, match="weights_only=True"):
        load_ema_state_dict(path, module=module)
    assert main(["export", str(path), str(tmp_path / "out.pt")]) == 2
    callback = EMACallback(init_from=path)
    with pytest.raises(ValueError, match="weights_only=True"):
        L.Trainer(max_steps=1, callbacks=[callback], **trainer_kwargs()).fit(Wrapped(), make_loader())
    assert not marker.exists()


# ------------------------------------------------------------------- resuming a Lightning EMAWeightAveraging run
def test_fit_with_ckpt_path_of_ema_weight_averaging_restores_raw_weights_and_the_average(tmp_path: Path) -> None:
    writer = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    first = L.Trainer(
        max_steps=4,
        callbacks=[EMAWeightAveraging(decay=0.9), writer],
        **trainer_kwargs(enable_checkpointing=True, default_root_dir=tmp_path),
    )
    first.fit(Wrapped(), make_loader())
    path = tmp_path / "step=4.ckpt"
    saved = torch.load(path, weights_only=True)
    assert "current_model_state" in saved and "averaging_state" in saved

    callback = EMACallback(decay=0.9)
    recorder = StartRecorder(callback)
    second = L.Trainer(max_steps=6, callbacks=[callback, recorder], **trainer_kwargs())
    second.fit(Wrapped(), make_loader(), ckpt_path=path)
    # the module trained on from the raw weights, the EMA from the average
    assert_same(recorder.weights_at_start, saved["current_model_state"])
    assert_same(recorder.start, saved["state_dict"])
    assert callback.num_updates == int(saved["averaging_state"]["n_averaged"]) + 2
    final = callback.ema_state_dict()
    for name in ("net.0.weight", "net.1.running_mean"):
        ema = saved["state_dict"][name].double()
        for raw in recorder.raw:
            ema = 0.9 * ema + 0.1 * raw[name].double()
        torch.testing.assert_close(final[name].double(), ema, rtol=0, atol=1e-6)
