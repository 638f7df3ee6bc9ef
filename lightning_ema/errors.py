"""The exceptions lightning-ema raises on purpose (importable from ``lightning_ema``)."""

from __future__ import annotations

__all__ = ["EMAStateError", "NonFiniteUpdateError"]


class EMAStateError(ValueError):
    """An EMA state is malformed or does not fit the module it is loaded into; nothing was loaded."""


class NonFiniteUpdateError(FloatingPointError):
    """An update was refused because a weight holds NaN or infinity."""
