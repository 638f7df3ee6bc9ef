"""Exponential moving averages of model weights for PyTorch Lightning.

``Trainer(callbacks=[EMACallback(decay=0.9999)])`` keeps an EMA of the weights, evaluates with it, saves it
in checkpoints and exports it for inference; ``MeanTeacherModule`` gives a LightningModule a teacher that is the
EMA of its student. Schedules live in :mod:`lightning_ema.schedules`.
"""

from lightning_ema.callback import EMACallback
from lightning_ema.checkpoint import export_ema, load_ema_state_dict
from lightning_ema.ema import EMA
from lightning_ema.errors import EMAStateError, NonFiniteUpdateError
from lightning_ema.mean_teacher import MeanTeacherModule

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "EMACallback",
    "EMAStateError",
    "MeanTeacherModule",
    "NonFiniteUpdateError",
    "__version__",
    "export_ema",
    "load_ema_state_dict",
]
