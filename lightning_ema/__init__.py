"""Exponential moving averages of model weights for PyTorch Lightning.

``Trainer(callbacks=[EMACallback(decay=0.9999)])`` keeps an EMA of the weights, evaluates with it, saves it
in checkpoints and exports it for inference; ``MeanTeacherModule`` gives a LightningModule a teacher that is the
EMA of its student; ``PostHocEMA`` snapshots power-function EMAs so that any EMA length can be synthesised after
training (:mod:`lightning_ema.posthoc`). Schedules live in :mod:`lightning_ema.schedules`.
"""

from lightning_ema.callback import EMACallback
from lightning_ema.checkpoint import export_ema, load_ema_state_dict
from lightning_ema.ema import EMA
from lightning_ema.errors import EMAStateError, NonFiniteUpdateError
from lightning_ema.mean_teacher import MeanTeacherModule
from lightning_ema.posthoc_callback import PostHocEMA

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "EMACallback",
    "EMAStateError",
    "MeanTeacherModule",
    "NonFiniteUpdateError",
    "PostHocEMA",
    "__version__",
    "export_ema",
    "load_ema_state_dict",
]
