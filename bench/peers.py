"""The peers: which are installed (pinned in bench/requirements.txt), and one optimizer step's update of each.

A peer that cannot be imported is reported as unavailable in every table; nothing is dropped silently. timm's
package ``__init__`` imports torchvision, so only its ``utils/model_ema.py`` is loaded when torchvision is absent.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .common import ALPHA, DECAY, Step, counter


@dataclass
class Peer:
    name: str
    package: str
    module: Any = None
    version: str = "-"
    error: str | None = None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _load_file_module(package: str, relative: str, alias: str) -> Any:
    """Load one module file of ``package`` without running the package's ``__init__`` (which may need torchvision)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    file_spec = importlib.util.spec_from_file_location(alias, path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[alias] = module
    file_spec.loader.exec_module(module)
    return module


def load_peers() -> dict[str, Peer]:
    peers: dict[str, Peer] = {}

    def attempt(key: str, package: str, loader: Callable[[], Any]) -> None:
        peer = Peer(key, package, version=_version(package))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peer.module = loader()
        except Exception as error:
            peer.error = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        peers[key] = peer

    def timm_loader() -> Any:
        try:
            return importlib.import_module("timm.utils.model_ema")
        except ModuleNotFoundError as error:
            if error.name != "torchvision":
                raise
            return _load_file_module("timm", "utils/model_ema.py", "_bench_timm_model_ema")

    attempt("lightning", "lightning", lambda: importlib.import_module("lightning.pytorch.callbacks"))
    attempt("torch", "torch", lambda: importlib.import_module("torch.optim.swa_utils"))
    attempt("timm", "timm", timm_loader)
    attempt("ema_pytorch", "ema-pytorch", lambda: importlib.import_module("ema_pytorch"))
    attempt("torch_ema", "torch-ema", lambda: importlib.import_module("torch_ema"))
    attempt("diffusers", "diffusers", lambda: importlib.import_module("diffusers.training_utils"))
    return peers


# ---------------------------------------------------------------------------------------------- update cases


@dataclass
class Case:
    """One method of an update table: how to build its step for a module, and which peer it needs."""

    name: str
    averages: str
    make: Callable[[nn.Module], Step]
    peer: str | None = None
    calls_per_step: int = 1


def peer_cases(peers: dict[str, Peer]) -> list[Case]:
    """The peers' updates, each as its library documents one step of it, and a bare multi-tensor lerp."""

    def lightning_ema_weight_averaging(module: nn.Module) -> Step:
        callback = peers["lightning"].module.EMAWeightAveraging(decay=DECAY)
        callback.setup(None, module, "fit")
        next_step = counter()
        return lambda: callback.on_train_batch_end(SimpleNamespace(global_step=next_step()), module, None, None, 0)

    def torch_averaged_model(module: nn.Module) -> Step:
        swa = peers["torch"].module
        averaged = swa.AveragedModel(module, multi_avg_fn=swa.get_ema_multi_avg_fn(DECAY), use_buffers=True)
        return lambda: averaged.update_parameters(module)

    def timm_v3(module: nn.Module) -> Step:
        ema = peers["timm"].module.ModelEmaV3(module, decay=DECAY)
        next_step = counter()
        return lambda: ema.update(module, step=next_step())

    def ema_pytorch(foreach: bool) -> Callable[[nn.Module], Step]:
        def make(module: nn.Module) -> Step:
            ema = peers["ema_pytorch"].module.EMA(
                module, beta=DECAY, update_after_step=0, update_every=1, use_foreach=foreach
            )
            return ema.update  # type: ignore[no-any-return]

        return make

    def torch_ema(module: nn.Module) -> Step:
        ema = peers["torch_ema"].module.ExponentialMovingAverage(module.parameters(), decay=DECAY)
        return ema.update  # type: ignore[no-any-return]

    def diffusers(foreach: bool) -> Callable[[nn.Module], Step]:
        def make(module: nn.Module) -> Step:
            ema = peers["diffusers"].module.EMAModel(module.parameters(), decay=DECAY, foreach=foreach)
            return lambda: ema.step(module.parameters())

        return make

    def bare_foreach(module: nn.Module) -> Step:
        live = [t for t in module.state_dict().values() if t.is_floating_point()]
        ema = [t.detach().clone() for t in live]
        return lambda: torch._foreach_lerp_(ema, live, ALPHA)

    all_floats = "params + float buffers"
    return [
        Case("Lightning `EMAWeightAveraging`", "params + all buffers", lightning_ema_weight_averaging, "lightning"),
        Case("torch `AveragedModel` + `get_ema_multi_avg_fn`", "params + all buffers", torch_averaged_model, "torch"),
        Case("timm `ModelEmaV3`", "params + float buffers", timm_v3, "timm"),
        Case("ema-pytorch `EMA` (use_foreach=True)", all_floats, ema_pytorch(True), "ema_pytorch"),
        Case("ema-pytorch `EMA` (default, per tensor)", all_floats, ema_pytorch(False), "ema_pytorch"),
        Case("torch-ema `ExponentialMovingAverage`", "params", torch_ema, "torch_ema"),
        Case("diffusers `EMAModel` (default, per tensor)", "params", diffusers(False), "diffusers"),
        Case("diffusers `EMAModel` (foreach=True)", "params", diffusers(True), "diffusers"),
        Case("reference: bare `torch._foreach_lerp_` over the same tensors", all_floats, bare_foreach),
    ]
