"""The accelerator side of an update: an on-device check read back later, and the side stream updates run on.

Pure torch. On the ``"device"`` path the host never waits for the device during an update: the non-finite check
leaves a flag there that the update kernels read, and its outcome is copied back to the host without blocking
(:class:`DeviceCheck`), to be read when the host next needs it. With a :class:`SideStream` the update's kernels
also overlap the next step's forward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DeviceCheck", "SideStream", "host_buffers"]


@dataclass
class DeviceCheck:
    """The outcome of an on-device non-finite check, read by the host only when it asks (:meth:`bad`).

    ``found`` is a float32 0-d tensor (``1.0``: some checked weight holds NaN or infinity) that the update kernels
    read on the device; ``flags`` says which tensor, in the order of ``names``.
    """

    flags: Tensor
    found: Tensor
    names: list[str]
    buffers: tuple[Tensor, Tensor] | None = None  # host memory to copy into (pinned on CUDA), reused
    _host: tuple[Tensor, Tensor] | None = None
    _event: Any = None

    def start_readback(self) -> None:
        """Copy the outcome to the host without waiting for it (pinned memory and an event on CUDA)."""
        if self.flags.is_meta:
            return  # meta tensors carry no values: there is nothing to read back
        if self.flags.device.type == "cpu":
            self._host = (self.flags, self.found)
            return
        host = self.buffers or host_buffers(self.flags)
        host[0].copy_(self.flags, non_blocking=True)
        host[1].copy_(self.found, non_blocking=True)
        self._host = host
        event = torch.Event(device=self.flags.device)
        event.record()
        self._event = event

    def ready(self) -> bool:
        """Whether :meth:`bad` can answer without waiting for the device."""
        return self._event is None or bool(self._event.query())

    def bad(self) -> tuple[bool, list[str]]:
        """Whether the update was skipped on the device, and the names of the tensors here that caused it.

        Waits only for the copy of this check's outcome (the device may still be busy with later work).
        """
        if self._host is None:
            return False, []
        if self._event is not None:
            self._event.synchronize()
        flags, found = self._host
        names = [name for name, is_bad in zip(self.names, flags.tolist(), strict=True) if is_bad]
        return float(found) != 0.0, names


def host_buffers(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Host memory for the readback of a check with these ``flags`` (pinned for CUDA, so the copy need not block)."""
    pinned = flags.device.type == "cuda"
    return (
        torch.empty(flags.shape, dtype=torch.bool, pin_memory=pinned),
        torch.empty((), dtype=torch.float32, pin_memory=pinned),
    )


class SideStream:
    """On CUDA, the stream an EMA's updates are issued on, so that they overlap the next step's forward pass.

    Args:
        device: the CUDA device of the EMA, or ``None``: no side stream (updates run in stream order, and
            :meth:`issuing` and :meth:`wait` do nothing).

    While it exists, every optimizer step waits for the last update (an optimizer step pre-hook; on the device, the
    host never waits), since that update may still be reading the weights the step writes.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.stream: Any = None
        self._done: Any = None
        self._hook: Any = None
        if device is None:
            return
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        ref = weakref.ref(self)

        def before_step(*_: Any) -> None:
            side = ref()
            if side is not None:
                side.wait()

        self._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(before_step)
        weakref.finalize(self, self._hook.remove)

    @contextmanager
    def issuing(self) -> Iterator[None]:
        """Context in which an update's kernels are issued: on the side stream, if there is one.

        The side stream first waits for the current stream (the optimizer step that wrote the weights); what
        reads the EMA or writes the weights afterwards must call :meth:`wait` first.
        """
        stream = self.stream
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            yield
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        self._done = done

    def wait(self) -> None:
        """Make the current stream wait (on the device, the host does not) for the last update's kernels."""
        done = self._done
        if done is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(done)

    def close(self) -> None:
        """Wait for the last update and stop making optimizer steps wait (the stream is not used again)."""
        self.wait()
        if self._hook is not None:
            self._hook.remove()
        self.stream = self._done = self._hook = None
