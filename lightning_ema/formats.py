"""Readers of other libraries' EMA checkpoint layouts, and writers of two of them (torch only).

Every reader returns the EMA as a plain ``{state_dict name: tensor}`` mapping, the names those of the model the
other library averaged (wrapper and EMA prefixes removed), so that ``model.load_state_dict`` and
``EMACallback(init_from=...)`` take it. Files are read with ``torch.load(weights_only=True)`` (only tensors and
plain values; ``argparse.Namespace``, which timm's training script saves as ``args``, is allowed too), so that a
pickle that would run code is refused.

Layouts (the name passed as ``format=``, and how it is recognised when ``format`` is ``None``):

- ``lightning``: Lightning ``EMAWeightAveraging``: ``state_dict`` is the average, the raw weights are in
  ``current_model_state`` (next to ``averaging_state``).
- ``nemo``: NeMo ``EMA``: ``X-EMA.ckpt`` beside ``X.ckpt`` is a Lightning checkpoint whose ``state_dict`` is the EMA
  (read from the path of either file; its optimizer states hold ``"ema"`` lists).
- ``timm``: timm's training checkpoints: ``state_dict_ema`` (or ``model_ema``), ``module.`` prefixes removed.
- ``mmengine``: mmengine ``EMAHook`` (mmdet, mmyolo ``ExpMomentumEMA``, mmagic, mmpretrain): ``state_dict`` is the
  EMA, ``ema_state_dict`` holds the raw weights under ``module.``.
- ``mean-teacher``: mmdet semi-supervised detectors (``MeanTeacherHook``) and ``MeanTeacherModule``: ``teacher.*``
  next to ``student.*``; the teacher is returned under the student's names.
- ``mmagic``: mmagic GANs: ``generator_ema.*`` (or ``generator_ema.module.*``) next to ``generator.*``; each
  ``X_ema`` is returned under ``X``'s names, with the other tensors (the discriminator) as saved.
- ``mmcv``: mmcv 1.x ``EMAHook``: ``ema_<name with _ for .>`` buffers in ``state_dict`` next to each parameter;
  the parameters' EMAs are returned under their names, buffers as saved.
- ``ema-pytorch``: lucidrains' ema-pytorch ``EMA.state_dict()``: ``ema_model.*`` next to ``initted`` and ``step``.
- ``diffusers``: diffusers ``EMAModel.state_dict()``: ``shadow_params``, a list in the order of the parameters.
- ``torch-ema``: torch-ema ``ExponentialMovingAverage.state_dict()``: ``shadow_params`` with ``num_updates``.

``diffusers`` and ``torch-ema`` keep their averages as positional lists without names, so they can only be
read with the module they were made from: its ``named_parameters()`` give the names, paired by order (and
checked by count and shape).
"""

from __future__ import annotations

# The public names, from the modules that implement them: _foreign recognises and reads the layouts, _init_from
# starts an EMA from any checkpoint and matches names, _export builds timm's and diffusers' layouts.
from lightning_ema._export import looks_like_buffer, to_diffusers, to_timm
from lightning_ema._files import allowed_globals
from lightning_ema._foreign import FOREIGN_FORMATS, ForeignEMA, detect_format, read_foreign
from lightning_ema._foreign import load_foreign as load_foreign  # not in __all__, as before the split
from lightning_ema._init_from import initial_ema, match_names

__all__ = [
    "FOREIGN_FORMATS",
    "ForeignEMA",
    "allowed_globals",
    "detect_format",
    "initial_ema",
    "looks_like_buffer",
    "match_names",
    "read_foreign",
    "to_diffusers",
    "to_timm",
]
