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

This module imports torch only.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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

FORMAT = "lightning-ema-posthoc"
VERSION = 1
#: The subfolder where snapshots that a resumed run replaces are moved; never read.
SUPERSEDED = "superseded"
#: The largest relative profile error :func:`synthesize` accepts unless told otherwise (see its ``max_error``).
DEFAULT_MAX_ERROR = 0.1

_FILE_NAME = re.compile(r"step-(\d+)(?:\.rank(\d+)-of-(\d+))?\.(pt|safetensors)")
_SUFFIXES = {"torch": ".pt", "safetensors": ".safetensors"}


# --------------------------------------------------------------------------------------------------
# The math: profiles, their inner products, the coefficients (float64)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Files: names, atomic writes, reading
# --------------------------------------------------------------------------------------------------


def snapshot_filename(
    step: int, *, rank: int | None = None, world_size: int | None = None, file_format: str = "torch"
) -> str:
    """Return the file name of a snapshot: ``step-0000001000.pt``, ``step-0000001000.rank1-of-2.safetensors``.

    >>> snapshot_filename(1000), snapshot_filename(20, rank=1, world_size=2, file_format="safetensors")
    ('step-0000001000.pt', 'step-0000000020.rank1-of-2.safetensors')
    """
    if file_format not in _SUFFIXES:
        raise ValueError(f"`file_format` must be 'torch' or 'safetensors', got {file_format!r}.")
    ranked = "" if rank is None else f".rank{rank}-of-{world_size}"
    return f"step-{step:010d}{ranked}{_SUFFIXES[file_format]}"


def parse_snapshot_filename(name: str) -> tuple[int, int | None, int | None] | None:
    """Return ``(step, rank, world_size)`` of a snapshot file name (``None`` for an unranked file), or ``None``.

    >>> parse_snapshot_filename("step-0000000020.rank1-of-2.pt"), parse_snapshot_filename("last.ckpt")
    ((20, 1, 2), None)
    """
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        return None
    step, rank, world_size = match.group(1), match.group(2), match.group(3)
    return int(step), None if rank is None else int(rank), None if world_size is None else int(world_size)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary)`` and ``os.replace``, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable where the platform allows it
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(directory)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(directory)


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ValueError(
            "Reading or writing .safetensors files needs the safetensors package: pip install safetensors."
        ) from error
    return safetensors


def _unshared(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Give tensors that share storage (tied weights) their own, and make all contiguous: safetensors needs it."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        shared = pointer in seen and tensor.numel() > 0
        result[name] = tensor.clone() if shared else tensor.contiguous()
        seen.add(pointer)
    return result


def save_state_dict(tensors: Mapping[str, Tensor], path: str | os.PathLike[str]) -> None:
    """Write a plain state dict atomically: safetensors for a ``.safetensors`` suffix, else ``torch.save``.

    Raises:
        ValueError: for a ``.safetensors`` path without the safetensors package.
    """
    output = Path(path)
    if output.suffix == ".safetensors":
        save_file = _safetensors().torch.save_file
        contiguous = _unshared(tensors)
        _atomic_write(output, lambda temporary: save_file(contiguous, str(temporary)))
    else:
        state = dict(tensors)
        _atomic_write(output, lambda temporary: torch.save(state, temporary))


def write_snapshot(
    path: str | os.PathLike[str],
    *,
    step: int,
    sigma_rels: Sequence[float],
    gammas: Sequence[float],
    emas: Sequence[Mapping[str, Tensor]],
    shards: Mapping[str, Mapping[str, Sequence[int]]] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """Write one snapshot file atomically; the format follows the suffix (``.safetensors`` or ``.pt``).

    Args:
        path: the file to write; :func:`snapshot_filename` gives the name :func:`list_snapshots` finds.
        step: the optimizer step the EMAs are as of, ``>= 1``.
        sigma_rels: the relative width of each EMA.
        gammas: the exponent of each EMA.
        emas: one mapping ``state_dict name -> tensor`` per EMA, in the order of ``sigma_rels``.
        shards: for tensors that are one rank's part of a larger tensor, ``{name: {"shape": global shape,
            "offset": index of the part's first element along each dimension}}``.
        rank: this rank, for a file that holds one rank's shards (``None``: the whole model).
        world_size: the number of ranks whose files make up the snapshot (with ``rank``).

    Raises:
        ValueError: if the arguments do not describe a snapshot.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"`step` must be an integer >= 1, got {step!r}.")
    if not (len(sigma_rels) == len(gammas) == len(emas)) or not emas:
        raise ValueError(
            f"`sigma_rels`, `gammas` and `emas` must have one entry per EMA, got {len(sigma_rels)}, {len(gammas)} "
            f"and {len(emas)}."
        )
    if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < int(world_size or 0)):
        raise ValueError(
            f"`rank` must be in [0, world_size) or both None, got rank={rank!r}, world_size={world_size!r}."
        )
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "sigma_rels": [float(value) for value in sigma_rels],
        "gammas": [float(value) for value in gammas],
        "rank": rank,
        "world_size": world_size,
        "shards": {
            name: {"shape": [int(n) for n in region["shape"]], "offset": [int(n) for n in region["offset"]]}
            for name, region in (shards or {}).items()
        },
    }
    output = Path(path)
    if output.suffix == ".safetensors":
        save_file = _safetensors().torch.save_file
        tensors = _unshared(
            {f"{index}/{name}": tensor for index, ema in enumerate(emas) for name, tensor in ema.items()}
        )
        metadata = {"format": FORMAT, "header": json.dumps(header)}
        _atomic_write(output, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    else:
        state = {**header, "emas": [dict(ema) for ema in emas]}
        _atomic_write(output, lambda temporary: torch.save(state, temporary))


#: Headers already read, by (path, inode, modification time, size): an atomic replace changes the key. Reading a
#: ``.pt`` header means loading its pickle (tens of milliseconds for hundreds of tensors), and a sweep lists the
#: folder once per width.
_HEADERS: dict[tuple[str, int, int, int], dict[str, Any]] = {}
_HEADERS_KEPT = 4096


def _read_header(path: Path) -> dict[str, Any]:
    status = path.stat()
    key = (str(path.resolve()), status.st_ino, status.st_mtime_ns, status.st_size)
    cached = _HEADERS.get(key)
    if cached is None:
        cached = _read_header_uncached(path)
        if len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.clear()
        _HEADERS[key] = cached
    return dict(cached)


def _read_header_uncached(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        with _safetensors().safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or "header" not in metadata:
            raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot (no {FORMAT!r} metadata).")
        header = dict(json.loads(metadata["header"]))
    else:
        state = _torch_load(path)
        header = {key: value for key, value in state.items() if key != "emas"}
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot: format {header.get('format')!r}.")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise ValueError(
            f"{str(path)!r} has snapshot format version {header.get('version')!r}; this lightning-ema reads versions "
            f"up to {VERSION}. Upgrade lightning-ema to read it."
        )
    return header


def _torch_load(path: Path) -> dict[str, Any]:
    try:  # mmap: the tensors are read from disk only when they are used
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"Cannot read the snapshot {str(path)!r}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a post-hoc EMA snapshot: it holds a {type(state).__name__}.")
    return state


def read_snapshot(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """Read one snapshot file: its header (every entry but the tensors) and one ``name -> tensor`` dict per EMA.

    Raises:
        ValueError: if the file is not a snapshot of a format version this package reads.
    """
    file = Path(path)
    header = _read_header(file)
    count = len(header["sigma_rels"])
    if file.suffix == ".safetensors":
        emas: list[dict[str, Tensor]] = [{} for _ in range(count)]
        with _safetensors().safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                index, _, name = key.partition("/")
                emas[int(index)][name] = handle.get_tensor(key)
    else:
        emas = [dict(ema) for ema in _torch_load(file)["emas"]]
    if len(emas) != count:
        raise ValueError(f"{str(file)!r} holds {len(emas)} EMAs for {count} sigma_rels.")
    return header, emas


# --------------------------------------------------------------------------------------------------
# The folder: which snapshots exist
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The snapshot of one step: the EMA of every tracked ``sigma_rel`` as of ``step``.

    Attributes:
        step: the optimizer step the EMAs are as of.
        sigma_rels: the relative width of each EMA, in the order they are stored.
        gammas: the exponent of each EMA.
        files: the file, or one file per rank (by rank) for a sharded model.
    """

    step: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    files: tuple[Path, ...]


def list_snapshots(dirpath: str | os.PathLike[str]) -> list[Snapshot]:
    """Return the complete snapshots in ``dirpath``, by step.

    A sharded snapshot is complete when every rank's file is there; an incomplete one (a run stopped between the
    ranks' writes) is left out with a warning. The ``superseded`` subfolder is not read.

    Raises:
        FileNotFoundError: if ``dirpath`` is not a folder.
        ValueError: if a file is not a readable snapshot, or one step has several complete snapshots.
    """
    folder = Path(dirpath)
    if not folder.is_dir():
        raise FileNotFoundError(f"No snapshot folder at {str(folder)!r}.")
    sets: dict[tuple[int, int | None], dict[int | None, tuple[Path, dict[str, Any]]]] = {}
    for file in sorted(folder.iterdir()):
        if not _FILE_NAME.fullmatch(file.name) or not file.is_file():
            continue
        header = _read_header(file)
        world_size = header.get("world_size")
        sets.setdefault((int(header["step"]), world_size), {})[header.get("rank")] = (file, header)
    by_step: dict[int, list[Snapshot]] = {}
    for (step, world_size), members in sorted(sets.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        expected = [None] if world_size is None else list(range(world_size))
        missing = [rank for rank in expected if rank not in members]
        if missing:
            warnings.warn(
                f"The snapshot of step {step} in {str(folder)!r} lacks the files of ranks {missing} (of {world_size}); "
                "it is left out.",
                UserWarning,
                stacklevel=2,
            )
            continue
        headers = [members[rank][1] for rank in expected]
        sigma_rels = tuple(float(value) for value in headers[0]["sigma_rels"])
        gammas = tuple(float(value) for value in headers[0]["gammas"])
        if any(tuple(h["sigma_rels"]) != sigma_rels for h in headers):
            raise ValueError(
                f"The rank files of the snapshot of step {step} in {str(folder)!r} disagree on sigma_rels."
            )
        snapshot = Snapshot(step, sigma_rels, gammas, tuple(members[rank][0] for rank in expected))
        by_step.setdefault(step, []).append(snapshot)
    duplicated = {step: [str(f) for s in found for f in s.files] for step, found in by_step.items() if len(found) > 1}
    if duplicated:
        raise ValueError(
            f"Several snapshots of the same step in {str(folder)!r}: {duplicated}. Keep one set of files per step."
        )
    return [found[0] for _, found in sorted(by_step.items())]


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


# --------------------------------------------------------------------------------------------------
# Shards: where one rank's part of a DTensor sits
# --------------------------------------------------------------------------------------------------


def shard_region(tensor: Tensor) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Return a DTensor's global shape, the offset of this rank's local shard in it, and whether this rank saves it.

    ``Shard(dim)`` placements split like ``torch.chunk`` (the last ranks may hold smaller or empty shards), one
    mesh dimension after another; over a ``Replicate()`` mesh dimension only the rank at coordinate 0 saves its
    copy, so the saved parts cover the tensor exactly once.

    Raises:
        ValueError: for placements other than ``Shard`` and ``Replicate`` (``Partial``, strided shards), or a local
            shard whose shape does not match.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    shape = tuple(int(n) for n in tensor.shape)
    local, offset = list(shape), [0] * len(shape)
    saves = coordinate is not None
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard:
            dim = placement.dim % max(1, len(shape))
            parts, index = mesh.size(mesh_dim), coordinate[mesh_dim] if coordinate else 0
            chunk = -(-local[dim] // parts)
            start = min(index * chunk, local[dim])
            offset[dim] += start
            local[dim] = max(0, min(chunk, local[dim] - start))
        elif isinstance(placement, Replicate):
            saves = saves and bool(coordinate) and coordinate[mesh_dim] == 0
        else:
            raise ValueError(
                f"Post-hoc EMA snapshots support DTensors sharded with Shard(dim) or Replicate(), got {placement!r}."
            )
    actual = tuple(tensor.to_local().shape)  # type: ignore[attr-defined]
    if tuple(local) != actual:
        raise ValueError(f"A local shard of shape {actual} does not match its layout (expected {tuple(local)}).")
    return shape, tuple(offset), saves
