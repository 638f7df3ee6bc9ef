"""The math of post-hoc EMA: inner products of power-function EMA profiles, the coefficients, the error.

Pure float64 tensor functions, public through :mod:`lightning_ema.posthoc`, whose docstring gives the formulas.
This module imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _column(values: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def profile_inner_products(
    steps_a: Sequence[float] | Tensor,
    gammas_a: Sequence[float] | Tensor,
    steps_b: Sequence[float] | Tensor,
    gammas_b: Sequence[float] | Tensor,
) -> Tensor:
    """Return the matrix of inner products ``<p_a_i, p_b_j>`` of power-function EMA profiles (float64).

    Profile ``i`` of a side is the one of exponent ``gammas[i]`` read at step ``steps[i]`` (see the module
    docstring for the formula).

    Args:
        steps_a: the steps of the first side's profiles, each ``> 0``.
        gammas_a: their exponents, each ``>= 0``, as many as ``steps_a``.
        steps_b: the steps of the second side's profiles, each ``> 0``.
        gammas_b: their exponents, as many as ``steps_b``.

    Returns:
        A ``(len(steps_a), len(steps_b))`` float64 tensor.

    >>> round(float(profile_inner_products([10.0], [0.0], [10.0], [0.0])), 6)  # a flat profile: 1/10 on (0, 10]
    0.1
    """
    t_a, g_a = _column(steps_a)[:, None], _column(gammas_a)[:, None]
    t_b, g_b = _column(steps_b)[None, :], _column(gammas_b)[None, :]
    if t_a.shape != g_a.shape or t_b.shape != g_b.shape:
        raise ValueError(
            f"`steps` and `gammas` must have one value per profile, got {t_a.numel()} steps and {g_a.numel()} "
            f"gammas, {t_b.numel()} steps and {g_b.numel()} gammas."
        )
    t_hi = torch.maximum(t_a, t_b)
    t_lo = torch.minimum(t_a, t_b)
    gamma_hi = torch.where(t_a >= t_b, g_a, g_b)
    scale = (g_a + 1.0) * (g_b + 1.0) / (g_a + g_b + 1.0)
    # (t_lo / t_hi) ** gamma_hi through logs: gammas of narrow EMAs are large, steps can be millions.
    return scale * torch.exp(gamma_hi * torch.log(t_lo / t_hi)) / t_hi


def solve_coefficients(
    steps: Sequence[float] | Tensor,
    gammas: Sequence[float] | Tensor,
    step: float,
    gamma: float,
) -> Tensor:
    """Return the coefficients that combine the given profiles into the target profile, summing to one (float64).

    The least-squares solution of ``A x = b`` (``A`` the profiles' inner products, ``b`` their inner products with
    the target, see the module docstring), by SVD so that nearly dependent profiles are fine, scaled to sum to one.

    Args:
        steps: the step of each snapshot profile, each ``> 0``.
        gammas: the exponent of each snapshot profile.
        step: the step at which the target is read, ``> 0``.
        gamma: the target's exponent, ``>= 0``.

    Returns:
        One coefficient per profile, a float64 tensor.

    Raises:
        ValueError: if no profile is given, or the coefficients cannot be scaled to sum to one.

    >>> [round(float(x), 6) for x in solve_coefficients([100, 100], [6.94, 16.97], 100, 16.97)]
    [0.0, 1.0]
    """
    steps_t, gammas_t = _column(steps), _column(gammas)
    if steps_t.numel() == 0:
        raise ValueError("`steps` must hold at least one snapshot profile, got none.")
    scale = float(step)
    matrix = profile_inner_products(steps_t / scale, gammas_t, steps_t / scale, gammas_t)
    target = profile_inner_products(steps_t / scale, gammas_t, [1.0], [gamma])
    solution: Tensor = torch.linalg.lstsq(matrix, target, driver="gelsd").solution.reshape(-1)
    total = float(solution.sum())
    if not math.isfinite(total) or abs(total) < 1e-12:
        raise ValueError(
            f"The snapshot profiles cannot represent the target (gamma={gamma!r} at step {step!r}): the "
            f"least-squares coefficients sum to {total!r}."
        )
    return solution / total


def profile_error(
    steps: Sequence[float] | Tensor,
    gammas: Sequence[float] | Tensor,
    coefficients: Sequence[float] | Tensor,
    step: float,
    gamma: float,
) -> float:
    """Return ``||sum_i x_i p_i - p*|| / ||p*||``, the relative L2 error of a combination of profiles.

    Args:
        steps: the step of each snapshot profile.
        gammas: the exponent of each snapshot profile.
        coefficients: the coefficient ``x_i`` of each profile.
        step: the step at which the target ``p*`` is read.
        gamma: the target's exponent.

    Returns:
        The relative error, ``0`` for an exact reconstruction.

    >>> profile_error([100], [6.94], [1.0], 100, 6.94)
    0.0
    """
    steps_t, gammas_t, x = _column(steps) / float(step), _column(gammas), _column(coefficients)
    matrix = profile_inner_products(steps_t, gammas_t, steps_t, gammas_t)
    target = profile_inner_products(steps_t, gammas_t, [1.0], [gamma]).reshape(-1)
    norm = (gamma + 1.0) ** 2 / (2.0 * gamma + 1.0)
    squared = float(x @ matrix @ x - 2.0 * (x @ target) + norm)
    return math.sqrt(max(squared, 0.0) / norm)
