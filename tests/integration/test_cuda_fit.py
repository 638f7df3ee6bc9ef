"""``Trainer.fit`` on a CUDA device with ``torch.cuda.set_sync_debug_mode("error")`` (skipped without CUDA).

Any host synchronisation raises in that mode. The first test turns it on only inside the EMA callback's hook (what
this project controls); the second around the whole fit, as the performance issue asks (with logging, progress bar
and validation off, so that Lightning itself has no reason to read a value).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from support import TinyClassifier, make_loader, trainer_kwargs

from lightning_ema import EMACallback

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class SyncErrorsAround(L.Callback):
    """Turns sync errors on right before the callbacks after it run ``on_train_batch_end``, off in ``Off``."""

    def on_train_batch_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("error")


class Off(L.Callback):
    def on_train_batch_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


def _trainer(callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(**trainer_kwargs(accelerator="gpu", max_steps=12, limit_val_batches=0, callbacks=callbacks))


@pytest.mark.parametrize("kwargs", [{}, {"nonfinite": "skip"}, {"device": "cpu"}, {"decay": [0.9, 0.99]}])
def test_the_ema_hook_never_synchronises(kwargs: dict[str, Any]) -> None:
    callback = EMACallback(**kwargs)
    try:
        _trainer([SyncErrorsAround(), callback, Off()]).fit(TinyClassifier(), make_loader())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert callback.ema is not None and callback.ema.num_updates == 12


def test_fit_with_sync_errors_on() -> None:
    callback = EMACallback(decay=0.9)
    model = TinyClassifier()
    loader = make_loader()
    trainer = _trainer([callback])
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.fit(model, loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(next(iter(callback.ema_state_dict().values()))).all()
