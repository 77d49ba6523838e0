"""The device side of a staged upload (:mod:`._upload`): pinned memory, device buffers, and the
copies and buffer events of each reader thread on one side stream.

Only this module touches CUDA; the reading and scheduling in :mod:`._upload` take any object with
the same methods, which is how the CPU tests replace it with one that copies on the CPU and
records the order of events.
"""

from __future__ import annotations

from typing import Any

import torch

from ..loader import resolve_device

__all__ = ["CudaStaging"]


class CudaStaging:
    """The device side: pinned memory, device buffers, copies on one side stream, and per-reader
    :meth:`lane` objects. Tests replace it with one that copies on the CPU and records the order
    of events."""

    def __init__(self, device: torch.device, *, cudart: bool = True, sync: bool = False) -> None:
        from . import _cudart

        self.cudart = cudart  # issue copies and events through libcudart when it is loaded
        # lanes with a stream per reader, waited on after each chunk (libcudart only: torch's
        # lanes keep events and the buffers they need); _upload reads this to size the buffers
        self.sync = sync and cudart and _cudart.lib() is not None
        self.stream = torch.cuda.Stream(device)
        # resolved here: a reader thread's current device is 0, not this thread's
        self.device = resolve_device(device)
        self.index: int = self.device.index

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def lane(self, slots: int) -> Any:
        """A reader thread's copies and ``slots`` buffer events (made in that thread)."""
        from . import _cudart

        rt = _cudart.lib() if self.cudart else None
        if self.sync:
            return _CudartSyncLane(rt, self.index)
        if rt is not None:
            return _CudartLane(rt, self.stream, self.index, slots)
        return _TorchLane(self.stream, self.index, slots)

    def finish(self) -> None:
        self.stream.synchronize()


class _TorchLane:
    """A reader's copies and events through torch (no shared libcudart)."""

    def __init__(self, stream: Any, index: int, slots: int) -> None:
        torch.cuda.set_device(index)  # this thread's current device
        self.stream = stream
        self.events: list[Any] = [None] * slots

    def copy(self, dst: torch.Tensor, dst_at: int, src: torch.Tensor, src_at: int, n: int) -> None:
        with torch.cuda.stream(self.stream):
            dst[dst_at:dst_at + n].copy_(src[src_at:src_at + n], non_blocking=True)

    def record(self, slot: int) -> None:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self.events[slot] = ev

    def wait(self, slot: int) -> None:
        if self.events[slot] is not None:
            self.events[slot].synchronize()

    def close(self) -> None:
        for slot in range(len(self.events)):
            self.wait(slot)


class _CudartCopies:
    """Copies through libcudart on ``self.stream`` (set by the lane): the GIL is released while
    each is issued."""

    def __init__(self, rt: Any) -> None:
        from ._cudart import H2D, check

        # bound once: copy() runs once per piece of every chunk
        self.rt, self.check, self.h2d = rt, check, H2D
        self.stream: Any = None

    def copy(self, dst: torch.Tensor, dst_at: int, src: torch.Tensor, src_at: int, n: int) -> None:
        rc = self.rt.cudaMemcpyAsync(dst.data_ptr() + dst_at, src.data_ptr() + src_at, n,
                                     self.h2d, self.stream)
        self.check(rc, "cudaMemcpyAsync (host to device)")


class _CudartLane(_CudartCopies):
    """A reader's copies and events through libcudart: the GIL is released while they are issued."""

    def __init__(self, rt: Any, stream: Any, index: int, slots: int) -> None:
        import ctypes

        from ._cudart import EVENT_DISABLE_TIMING, check

        super().__init__(rt)
        self.stream = stream.cuda_stream
        self.events: list[Any] = []
        self.used = [False] * slots
        check(rt.cudaSetDevice(index), "cudaSetDevice")
        try:
            for _ in range(slots):
                ev = ctypes.c_void_p()
                check(rt.cudaEventCreateWithFlags(ctypes.byref(ev), EVENT_DISABLE_TIMING),
                      "cudaEventCreateWithFlags")
                self.events.append(ev)
        except BaseException:
            self.close()
            raise

    def record(self, slot: int) -> None:
        self.check(self.rt.cudaEventRecord(self.events[slot], self.stream), "cudaEventRecord")
        self.used[slot] = True

    def wait(self, slot: int) -> None:
        if self.used[slot]:
            self.check(self.rt.cudaEventSynchronize(self.events[slot]), "cudaEventSynchronize")
            self.used[slot] = False

    def close(self) -> None:
        """Wait for the copies out of every buffer, then free the events."""
        events, self.events = self.events, []
        for slot, ev in enumerate(events):
            if self.used[slot]:
                self.rt.cudaEventSynchronize(ev)
            self.rt.cudaEventDestroy(ev)


class _CudartSyncLane(_CudartCopies):
    """A reader's copies on a stream of its own, waited for as soon as a chunk's are queued.

    One buffer per reader is enough (the reader refills it only after its copies are done), and
    a chunk costs one runtime call less than with events (a stream wait instead of an event
    record and a later event wait): fewer times a reader gives up and takes back the GIL.
    """

    def __init__(self, rt: Any, index: int) -> None:
        import ctypes

        from ._cudart import STREAM_NON_BLOCKING, check

        super().__init__(rt)
        check(rt.cudaSetDevice(index), "cudaSetDevice")
        stream = ctypes.c_void_p()
        check(rt.cudaStreamCreateWithFlags(ctypes.byref(stream), STREAM_NON_BLOCKING),
              "cudaStreamCreateWithFlags")
        self.stream = stream

    def record(self, slot: int) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def wait(self, slot: int) -> None:
        return None  # record() already waited

    def close(self) -> None:
        """Wait for this reader's copies, then free its stream."""
        stream, self.stream = self.stream, None
        if stream is not None:
            self.rt.cudaStreamSynchronize(stream)
            self.rt.cudaStreamDestroy(stream)
