"""Binding an EMA to a module: what may be bound, the storage of the selected tensors, and re-pairing them.

Torch only. :class:`BoundEMA` is the first layer of :class:`~lightning_ema.EMA`: it holds the settings, the module
(and a ``target`` module that holds the EMA), the :class:`~lightning_ema._groups.Storage` of the tensors
:func:`~lightning_ema._selection.select` picks, and their :class:`~lightning_ema._swaps.Swaps`. It binds again
(keeping the averages, paired by name) when a saved state is loaded or the module's tensors were replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ema import functional as F
from lightning_ema import sharding as S
from lightning_ema._config import EMAConfig
from lightning_ema._groups import Storage
from lightning_ema._selection import align_names, fingerprint, localize, select, target_tensors, unmatched_patterns
from lightning_ema._swaps import Swaps
from lightning_ema.errors import EMAStateError
from lightning_ema.schedules import DecaySchedule

__all__ = ["BoundEMA", "check_bindable"]


def check_bindable(module: nn.Module, config: EMAConfig, target: nn.Module | None) -> None:
    """Raise unless an EMA with ``config`` can bind to ``module`` (and keep its average in ``target``).

    Raises:
        ValueError: if ``module`` or ``target`` is not a module, ``device`` cannot be used here, or ``target`` is
            the module itself or comes with a ``device``, a ``dtype`` or several decays (a target holds the one
            EMA with its own devices and dtypes).
        EMAStateError: if the module has lazy parameters or buffers, which have no values to average yet.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    if target is not None and not isinstance(target, nn.Module):
        raise ValueError(f"`target` must be None or a torch.nn.Module, got {target!r}.")
    _check_device(config.device)
    if target is not None and (
        target is module or config.device is not None or config.dtype is not None or len(config.schedules) > 1
    ):
        raise ValueError(
            "`target` must be a module other than the tracked one and holds the one EMA with its own devices "
            f"and dtypes, got target={type(target).__name__} with device={config.device!r}, "
            f"dtype={config.dtype!r} and {len(config.schedules)} decays."
        )
    tensors = [*module.named_parameters(), *module.named_buffers()]
    lazy = [name for name, tensor in tensors if nn.parameter.is_lazy(tensor)]
    if lazy:
        raise EMAStateError(
            f"The module has uninitialized (lazy) parameters or buffers {lazy[:5]}: run one forward pass to "
            "materialise them before creating its EMA."
        )


def _check_device(device: torch.device | None) -> None:
    """Raise ``ValueError`` unless this process can allocate on ``device`` (``None``: with each weight)."""
    if device is None:
        return
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch asserts when it was built without that accelerator
        raise ValueError(f"`device` must be a device this process can use, got {str(device)!r}: {error}") from None


class BoundEMA:
    """The settings of an EMA and its binding to a module: the selected tensors' storage, swaps and sharding."""

    config: EMAConfig
    _module: nn.Module
    _target: nn.Module | None
    _side_stream: bool
    _storage: Storage
    _swaps: Swaps
    _sharding: dict[str, S.Sharding]
    _fingerprint: dict[str, Any]

    def _bind(self, module: nn.Module, config: EMAConfig, target: nn.Module | None) -> None:
        """Bind to ``module`` as a copy of its weights (or of ``target``'s tensors), after :func:`check_bindable`."""
        check_bindable(module, config, target)
        self.config = config
        self._module = module
        self._target = target
        self._side_stream = False
        self._rebuild(None)
        for argument, patterns in (("include", config.include), ("exclude", config.exclude)):
            unmatched = unmatched_patterns(module, patterns)
            if unmatched:
                warnings.warn(
                    f"`{argument}` pattern(s) {unmatched} match no state_dict name of the module (names are matched "
                    f"without wrapper prefixes, e.g. {list(map(F.canonical_name, module.state_dict()))[:3]!r}).",
                    UserWarning,
                    stacklevel=4,  # _bind, _setup, EMA() or EMA.from_config, the caller
                )

    def _rebuild(self, sources: Sequence[Mapping[str, Tensor]] | None) -> None:
        """Select the module's tensors and allocate their storage (from ``sources`` by name, or the weights).

        Raises:
            EMAStateError: if no tensor is selected, or ``sources`` or the target do not match the module; the
                binding is left as it was then.
        """
        module = self._module
        S.reshard_all(module)  # an unsharded FSDP2 root would show full tensors instead of its DTensors
        config = self.config
        selected = select(
            module,
            include=config.include,
            exclude=config.exclude,
            buffers=config.buffers,
            integer_buffers=config.integer_buffers,
        )
        if not selected:
            raise EMAStateError(
                "No tensors of the module are selected for the EMA. Check `include`, `exclude` and `buffers`; "
                f"state_dict names start with {list(module.state_dict())[:5]!r}."
            )
        targets = None
        if self._target is not None:
            targets = align_names(target_tensors(self._target, selected), selected)
        if sources is not None:
            sources = [align_names(localize(source, selected), selected) for source in sources]
        storage = Storage(
            selected,
            sources,
            targets,
            num_emas=len(config.schedules),
            device=config.device,
            dtype=config.dtype,
            side_stream=self._side_stream,
        )
        sharding = {name: item.sharding for item in selected if item.sharding for name in item.names}
        self._storage = storage
        self._swaps = Swaps(storage, module, sharded=bool(sharding))
        self._sharding = sharding
        self._fingerprint = self._fingerprint_now()

    def _fingerprint_now(self) -> dict[str, Any]:
        now = {"module": fingerprint(self._module)}
        if self._target is not None:
            now["target"] = fingerprint(self._target)
        return now

    def _rebind_replaced(self) -> list[str]:
        """Bind again, keeping the averages, if tensors were replaced behind the EMA; return their names.

        Raises:
            EMAStateError: if a tracked tensor changed shape, or tensors appeared or disappeared; it names them.
        """
        if self._sharding:
            S.reshard_all(self._module)  # after validation an FSDP2 root holds unsharded stand-ins
        now = self._fingerprint_now()
        if now == self._fingerprint:
            return []
        changed = sorted(
            name
            for part, tensors in now.items()
            for name, identity in tensors.items()
            if self._fingerprint.get(part, {}).get(name) != identity
        )
        gone = sorted(set(self._fingerprint["module"]) - set(now["module"]))
        sources = None if self._target is not None else [self._swaps.ema_by_name(k) for k in range(self.num_emas)]
        try:
            self._rebuild(sources)
        except EMAStateError as error:
            detail = str(error).replace("The EMA state does not match the model, nothing was loaded; ", "")
            raise EMAStateError(
                f"The module's tensors changed behind the EMA ({changed + gone}); the EMA was left as it was: {detail}"
            ) from None
        return changed + gone

    # ------------------------------------------------------------------ read-only state
    @property
    def module(self) -> nn.Module:
        """The module whose weights are averaged."""
        return self._module

    @property
    def schedules(self) -> tuple[DecaySchedule, ...]:
        """One schedule per EMA (a float decay is a ``ConstantDecay``)."""
        return self.config.schedules

    @property
    def schedule(self) -> DecaySchedule:
        """The schedule of the first (often the only) EMA."""
        return self.config.schedules[0]

    @property
    def num_emas(self) -> int:
        """How many EMAs are kept, one per decay."""
        return len(self.config.schedules)

    @property
    def is_swapped(self) -> bool:
        """Whether the EMA is in the module in place of the raw weights."""
        return self._swaps.depth > 0

    @property
    def sharding(self) -> dict[str, S.Sharding]:
        """The layout of every tracked name whose weight is a DTensor; its EMA tensors are local shards."""
        return dict(self._sharding)

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_emas:
            raise ValueError(f"`index` must be an integer in [0, {self.num_emas}), got {index!r}.")
        return index
