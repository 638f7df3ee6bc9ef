"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

During training, :class:`~lightning_ema.PostHocEMA` keeps a few power-function EMAs and saves *snapshots* of them
every few steps. After training, :func:`synthesize` combines the snapshots into the EMA of any other relative width
``sigma_rel``, so the EMA length is chosen by evaluating candidates instead of training once per candidate.

**The profiles.** The power-function EMA with exponent ``gamma`` (``KarrasDecay``: ``decay_s = (1 - 1/s) ** (gamma
+ 1)``), read after optimizer step ``t``, gives the weights of step ``s`` the share ``(s/t) ** (gamma + 1) - ((s -
1)/t) ** (gamma + 1)``: the integral over ``(s - 1, s]`` of its *profile*

    p(tau) = (gamma + 1) * tau ** gamma / t ** (gamma + 1)      for 0 < tau <= t (0 after t),

so the EMA equals ``integral of p(tau) * W(tau) dtau`` exactly, where ``W(tau)`` is the weights in force at time
``tau`` (with ``every_n_steps > 1``, the weights of each update held over the steps it covers; an EMA started from
a checkpoint's weights at step ``k``, those weights held over ``(0, k]``). ``sigma_rel`` is the profile's standard
deviation relative to ``t``: ``sigma_rel ** 2 = (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))``.

**The synthesis.** Two profiles, read at steps ``t_a``, ``t_b`` with exponents ``gamma_a``, ``gamma_b``, have the
inner product (``t_hi = max(t_a, t_b)``, ``t_lo = min(t_a, t_b)``, ``gamma_hi`` the exponent of the one read at
``t_hi``)

    <p_a, p_b> = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_lo / t_hi) ** gamma_hi / t_hi.

The snapshots taken at steps ``t_i <= T`` give profiles ``p_i`` (one per tracked width and step). For a target
profile ``p*`` (width ``sigma_rel``, read at step ``T``), the coefficients ``x`` minimise ``||sum_i x_i p_i - p*||``
in L2: they solve the normal equations ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p*>``, in float64
by an SVD least-squares solve (many snapshots make ``A`` nearly singular), then are scaled to sum to one (as EDM2
does, so that weights that never change are reproduced exactly). The synthesised EMA is ``sum_i x_i * ema_i``.
Its :func:`reconstruction_error` is ``||sum_i x_i p_i - p*|| / ||p*|| = sqrt(x'Ax - 2 x'b + c) / sqrt(c)`` with
``c = <p*, p*> = (gamma* + 1) ** 2 / ((2 gamma* + 1) T)``: 0 for a tracked width at a snapshot step, small between
the tracked widths, growing outside them (narrow targets need dense snapshots; wide ones extrapolate).

**The files.** One file per snapshot step in the snapshot folder, ``step-0000001000.safetensors`` (or ``.pt``),
written atomically (a temporary file, then ``os.replace``). Under FSDP2 each rank writes the EMA of its own shards,
``step-0000001000.rank1-of-2.pt``; :func:`synthesize` puts the shards together in one process. A ``.pt`` file is
a dict of plain values and tensors that ``torch.load(path, weights_only=True)`` reads::

    {"format": "lightning-ema-posthoc", "version": 1, "step": 1000,
     "sigma_rels": [0.05, 0.1], "gammas": [16.97..., 6.94...],
     "rank": None, "world_size": None,                        # or this rank and the number of ranks
     "shards": {},                                             # name -> {"shape": global shape, "offset": [...]}
     "emas": [{state_dict name: tensor}, ...]}                 # one dict per sigma_rel, in that order

A ``.safetensors`` file holds the tensors under ``"{index}/{name}"`` and the rest as JSON in its metadata
(``"lightning-ema-posthoc"``). Files in the ``superseded`` subfolder (snapshots of an interrupted run after the
step a resumed run started from) are not read.

The math is in ``_profiles`` and the files in ``_snapshots``; both are public here. This module imports torch
only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_ema._profiles import profile_error, profile_inner_products, solve_coefficients
from lightning_ema._snapshots import (
    FORMAT,
    SUPERSEDED,
    VERSION,
    Snapshot,
    list_snapshots,
    parse_snapshot_filename,
    read_snapshot,
    save_state_dict,
    shard_region,
    snapshot_filename,
    write_snapshot,
)
from lightning_ema.schedules import KarrasDecay

__all__ = [
    "DEFAULT_MAX_ERROR",
    "FORMAT",
    "SUPERSEDED",
    "VERSION",
    "Snapshot",
    "SynthesisPlan",
    "list_snapshots",
    "parse_snapshot_filename",
    "profile_error",
    "profile_inner_products",
    "read_snapshot",
    "reconstruction_error",
    "save_state_dict",
    "shard_region",
    "snapshot_filename",
    "solve_coefficients",
    "synthesis_plan",
    "synthesize",
    "synthesize_many",
    "write_snapshot",
]

#: The largest relative profile error :func:`synthesize` accepts unless told otherwise (see its ``max_error``).
DEFAULT_MAX_ERROR = 0.1


# --------------------------------------------------------------------------------------------------
# The synthesis
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthesisPlan:
    """How one EMA is synthesised: which snapshot EMAs, with which coefficients, and how well.

    Attributes:
        sigma_rel: the target's relative width.
        gamma: the target's exponent.
        step: the step the target is read at (a snapshot step).
        snapshots: the snapshots used (every one up to ``step``).
        coefficients: ``coefficients[i][k]`` multiplies EMA ``k`` of ``snapshots[i]`` (float64; they sum to one).
        error: the relative profile error, see :func:`reconstruction_error`.
    """

    sigma_rel: float
    gamma: float
    step: int
    snapshots: tuple[Snapshot, ...]
    coefficients: Tensor
    error: float

    @property
    def tracked_range(self) -> tuple[float, float]:
        """The smallest and largest ``sigma_rel`` tracked by the snapshots."""
        values = [sigma for snapshot in self.snapshots for sigma in snapshot.sigma_rels]
        return min(values), max(values)


def _usable(dirpath: str | os.PathLike[str], step: int | None) -> tuple[int, list[Snapshot]]:
    snapshots = list_snapshots(dirpath)
    if not snapshots:
        raise ValueError(f"`dirpath` must hold post-hoc EMA snapshots, got {str(dirpath)!r} with none.")
    steps = [snapshot.step for snapshot in snapshots]
    if step is None:
        target = steps[-1]
    elif isinstance(step, bool) or not isinstance(step, int) or step not in steps:
        number = isinstance(step, int) and not isinstance(step, bool)
        before = [s for s in steps if number and s < step][-1:]
        after = [s for s in steps if number and s > step][:1]
        nearby = before + after if number else steps[-1:]
        raise ValueError(
            f"`step` must be the step of a snapshot in {str(dirpath)!r} (the weights after the last snapshot before it "
            f"are in no snapshot), got {step!r}. Nearest: {nearby}; all from {steps[0]} to {steps[-1]}."
        )
    else:
        target = step
    return target, [snapshot for snapshot in snapshots if snapshot.step <= target]


def _plan(snapshots: list[Snapshot], step: int, sigma_rel: float) -> SynthesisPlan:
    gamma = KarrasDecay(sigma_rel=sigma_rel).gamma  # validates sigma_rel with the schedule's message
    steps = [float(s.step) for s in snapshots for _ in s.gammas]
    gammas = [gamma_i for s in snapshots for gamma_i in s.gammas]
    flat = solve_coefficients(steps, gammas, step, gamma)
    error = profile_error(steps, gammas, flat, step, gamma)
    rows, start = [], 0
    for snapshot in snapshots:
        rows.append(flat[start : start + len(snapshot.gammas)])
        start += len(snapshot.gammas)
    width = max(len(s.gammas) for s in snapshots)
    coefficients = torch.zeros(len(snapshots), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        coefficients[i, : row.numel()] = row
    return SynthesisPlan(float(sigma_rel), gamma, step, tuple(snapshots), coefficients, error)


def synthesis_plan(dirpath: str | os.PathLike[str], sigma_rel: float, *, step: int | None = None) -> SynthesisPlan:
    """Return how :func:`synthesize` would build the EMA of width ``sigma_rel`` as of ``step`` (nothing is loaded).

    Raises:
        ValueError: for a ``sigma_rel`` outside ``(0, sqrt(1/12)]``, a ``step`` that is not a snapshot step, or a
            folder without snapshots.
    """
    target, snapshots = _usable(dirpath, step)
    return _plan(snapshots, target, sigma_rel)


def reconstruction_error(dirpath: str | os.PathLike[str], sigma_rel: float, *, step: int | None = None) -> float:
    """Return how well the snapshots in ``dirpath`` cover ``sigma_rel``: the relative profile error.

    ``||sum_i x_i p_i - p*|| / ||p*||`` in L2 over the training time, where ``p*`` is the profile of the requested
    EMA and ``x_i`` the coefficients :func:`synthesize` uses (see the module docstring). ``0`` for a tracked width
    at a snapshot step. It bounds the synthesised weights' distance from the exact EMA: the residual profile integrates
    to zero (the coefficients sum to one), so by Cauchy-Schwarz the error is at most this times
    ``||p*|| * ||W - mean(W)||``, both L2 over ``(0, step]``, where ``W`` is the weights over training time.

    Raises:
        ValueError: as :func:`synthesis_plan`.
    """
    return synthesis_plan(dirpath, sigma_rel, step=step).error


def synthesize(
    dirpath: str | os.PathLike[str],
    sigma_rel: float,
    *,
    step: int | None = None,
    max_error: float | None = DEFAULT_MAX_ERROR,
) -> dict[str, Tensor]:
    """Return the EMA of relative width ``sigma_rel`` as of ``step``, synthesised from the snapshots in ``dirpath``.

    Floating-point tensors are the least-squares combination of the snapshot EMAs (accumulated in float64, returned
    in float32, or float64 where the snapshots hold float64); other tensors (integer buffers) come from the snapshot
    of ``step``. Shards written by several ranks are put together into full tensors. The names are the
    LightningModule's ``state_dict`` names, ready for ``model.load_state_dict(weights, strict=False)`` (tensors the
    EMA did not track are absent).

    Args:
        dirpath: the snapshot folder of a :class:`~lightning_ema.PostHocEMA` run.
        sigma_rel: the relative width of the EMA to synthesise, in ``(0, sqrt(1/12)]``.
        step: the snapshot step the EMA is read at; ``None`` is the last one.
        max_error: the largest :func:`reconstruction_error` accepted; ``None`` accepts any.

    Raises:
        ValueError: for a ``sigma_rel`` the snapshots cannot support (outside ``(0, sqrt(1/12)]`` or with an error
            above ``max_error``), a ``step`` that is not a snapshot step, or snapshots that do not fit together.

    Example::

        weights = synthesize("lightning_logs/posthoc_ema", sigma_rel=0.07)
        model.load_state_dict(weights, strict=False)
    """
    return synthesize_many(dirpath, [sigma_rel], step=step, max_error=max_error)[float(sigma_rel)]


def synthesize_many(
    dirpath: str | os.PathLike[str],
    sigma_rels: Iterable[float],
    *,
    step: int | None = None,
    max_error: float | None = DEFAULT_MAX_ERROR,
) -> dict[float, dict[str, Tensor]]:
    """Synthesise several EMAs in one pass over the snapshot files; see :func:`synthesize`.

    Returns:
        ``{sigma_rel: state dict}`` in the order given (one full copy of the EMA'd tensors each, on the CPU).
    """
    wanted = list(dict.fromkeys(float(sigma) for sigma in sigma_rels))
    if not wanted:
        raise ValueError("`sigma_rels` must hold at least one relative width, got none.")
    if max_error is not None and (
        isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or max_error < 0
    ):
        raise ValueError(f"`max_error` must be None or a number >= 0, got {max_error!r}.")
    target, snapshots = _usable(dirpath, step)
    plans = [_plan(snapshots, target, sigma) for sigma in wanted]
    for plan in plans:
        if max_error is not None and plan.error > max_error:
            low, high = plan.tracked_range
            raise ValueError(
                f"`sigma_rel` must be one the snapshots can reconstruct within max_error={max_error!r}, got "
                f"{plan.sigma_rel!r}: its relative profile error is {plan.error:.3g} (the snapshots track sigma_rel "
                f"{low!r} to {high!r}, {len(snapshots)} snapshots up to step {target}). Choose a width closer to "
                "that range, snapshot more often, or pass a larger max_error."
            )
    return _accumulate(plans, snapshots, target)


class _Output:
    """One synthesised state dict being accumulated: float64 sums of the floating tensors, the others as read."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}


def _region(header: Mapping[str, Any], name: str, tensor: Tensor) -> tuple[tuple[int, ...], tuple[slice, ...] | None]:
    """The full shape of ``name`` and where this file's ``tensor`` sits in it (``None``: the whole tensor)."""
    shard = header.get("shards", {}).get(name)
    if shard is None:
        return tuple(tensor.shape), None
    shape, offset = tuple(shard["shape"]), tuple(shard["offset"])
    if len(shape) != tensor.dim() or len(offset) != tensor.dim():
        raise ValueError(f"The shard of {name!r} has {tensor.dim()} dimensions, its layout {shape}, {offset}.")
    return shape, tuple(slice(start, start + size) for start, size in zip(offset, tensor.shape, strict=True))


def _accumulate(plans: list[SynthesisPlan], snapshots: list[Snapshot], target: int) -> dict[float, dict[str, Tensor]]:
    outputs = [_Output() for _ in plans]
    expected: dict[str, tuple[int, ...]] | None = None
    for i, snapshot in enumerate(snapshots):
        shapes: dict[str, tuple[int, ...]] = {}
        covered: dict[tuple[int, str], int] = {}
        for file in snapshot.files:
            header, emas = read_snapshot(file)
            for k, ema in enumerate(emas):
                for name, tensor in ema.items():
                    shape, where = _region(header, name, tensor)
                    if shapes.setdefault(name, shape) != shape:
                        raise ValueError(f"The files of step {snapshot.step} disagree on the shape of {name!r}.")
                    covered[(k, name)] = covered.get((k, name), 0) + tensor.numel()
                    _add(outputs, plans, i, k, name, tensor, shape, where, copy=snapshot.step == target and k == 0)
        incomplete = sorted({name for (_, name), count in covered.items() if count != math.prod(shapes[name])})
        if incomplete:
            raise ValueError(
                f"The snapshot of step {snapshot.step} does not cover the whole of {incomplete}: shards are missing "
                "or overlap."
            )
        if expected is None:
            expected = shapes
        elif shapes != expected:
            differ = sorted(set(shapes) ^ set(expected)) or sorted(n for n in shapes if shapes[n] != expected[n])
            raise ValueError(
                f"The snapshots of steps {snapshots[0].step} and {snapshot.step} hold different tensors or shapes "
                f"({differ}); they are not snapshots of one model."
            )
    results = {}
    for plan, output in zip(plans, outputs, strict=True):
        state = {}
        for name, tensor in output.tensors.items():
            dtype = output.dtypes[name]
            if dtype.is_floating_point:
                dtype = torch.float64 if dtype == torch.float64 else torch.float32
            state[name] = tensor.to(dtype)
        results[plan.sigma_rel] = state
    return results


def _add(
    outputs: list[_Output],
    plans: list[SynthesisPlan],
    i: int,
    k: int,
    name: str,
    tensor: Tensor,
    shape: tuple[int, ...],
    where: tuple[slice, ...] | None,
    *,
    copy: bool,
) -> None:
    floating = tensor.is_floating_point()
    if not floating and not copy:
        return
    value = tensor.to(torch.float64) if floating else tensor
    for plan, output in zip(plans, outputs, strict=True):
        current = output.tensors.get(name)
        if current is None:
            current = torch.zeros(shape, dtype=torch.float64 if floating else tensor.dtype)
            output.tensors[name] = current
            output.dtypes[name] = tensor.dtype
        part = current if where is None else current[where]
        if floating:
            coefficient = float(plan.coefficients[i, k])
            if coefficient:
                part.add_(value, alpha=coefficient)
        else:
            part.copy_(value)
