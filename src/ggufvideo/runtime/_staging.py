"""Host memory the GPU can copy from asynchronously, without a second copy of the weights.

Host-to-device copies run at full speed (and off the compute stream) only from page-locked
memory. Instead of pinning a *copy* of every streamed weight (twice the file in RAM), the host
memory is registered with ``cudaHostRegister``: page-aligned ranges are merged and locked. For
weights memory-mapped from a GGUF file that is the page cache itself, locked through a shared
read-only mapping of the file (locking the private mapping the tensors view would give the
process a copy of every page: :mod:`._filemap`).

Other host tensors are *not* locked in place: locking works on whole pages, and the first and
last page of a tensor from the heap hold other allocations too -- any later copy of one of those
(an input moved to the GPU with ``.cuda()``) would then straddle the edge of a locked range,
which CUDA refuses ("invalid argument"; seen on an H100 host as an intermittent failure of a
streamed forward). :func:`locked_storage` instead moves such a tensor's bytes into an anonymous
mapping of its own, locked whole; the tensor keeps its identity, its old memory is freed. Where
locking fails (an old driver, a locked-memory limit), the caller pins a copy, and
:attr:`HostRegistration.copied_bytes` says how much was copied.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import warnings
from typing import Any

import torch

__all__ = ["HostRegistration", "register_host", "locked_storage"]

_READ_ONLY = 8  # cudaHostRegisterReadOnly
_DEFAULT = 0


class HostRegistration:
    """Page-locked host ranges; :meth:`release` unregisters them (also on garbage collection)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []  # locked, by start (see add)
        self.registered_bytes = 0
        #: of those, bytes locked through a shared mapping of their file (not in place)
        self.remapped_bytes = 0
        #: of those, bytes moved into mappings of their own (:func:`locked_storage`)
        self.moved_bytes = 0
        self.copied_bytes = 0
        self._keep: list[object] = []

    def add(self, start: int, end: int) -> None:
        """Record the locked range ``[start, end)``."""
        bisect.insort(self.ranges, (start, end))  # kept by start (ranges never overlap)
        self.registered_bytes += end - start

    def covers(self, ptr: int, nbytes: int) -> bool:
        """Whether ``[ptr, ptr + nbytes)`` lies in one locked range (a binary search: offload
        asks this once per streamed tensor)."""
        i = bisect.bisect_right(self.ranges, (ptr, 1 << 64)) - 1  # the last range starting <= ptr
        return i >= 0 and ptr + nbytes <= self.ranges[i][1]

    def release(self) -> None:
        if not self.ranges:
            return
        rt = torch.cuda.cudart()
        for start, _ in self.ranges:
            rt.cudaHostUnregister(start)
        self.ranges = []
        self._keep = []

    def __del__(self) -> None:  # noqa: D105
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass


def _clear_cuda_error() -> None:
    """``cudaGetLastError()`` (torch has no binding), else the next kernel-launch check reports
    the failed registration."""
    from ._cudart import lib

    rt = lib()
    if rt is not None:
        rt.cudaGetLastError()


def _merged_ranges(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    page = mmap.PAGESIZE
    spans = []
    for t in tensors:
        nb = t.numel() * t.element_size()
        if nb == 0:
            continue
        start = t.data_ptr() // page * page
        end = -(-(t.data_ptr() + nb) // page) * page
        spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _register(rt: Any, ranges: list[tuple[int, int]], reg: HostRegistration) -> None:
    """Lock each range (read-only first), recording those that locked in ``reg``."""
    for start, end in ranges:
        ok = False
        for flags in (_READ_ONLY, _DEFAULT):
            ok = int(rt.cudaHostRegister(start, end - start, flags)) == 0
            if ok:
                break
            _clear_cuda_error()  # else the next kernel-launch check reports it
        if ok:
            reg.add(start, end)


def register_host(tensors: list[torch.Tensor], device: torch.device | None = None
                  ) -> tuple[HostRegistration, list[torch.Tensor | None]]:
    """Page-lock the memory of plain CPU ``tensors`` without copying them.

    A tensor privately mapped from a file (a GGUF file's weights) whose pages are still the
    file's is locked through a shared read-only mapping of the same bytes (see
    :mod:`._filemap`: locking the private mapping would copy every page); no other tensor is
    locked here (see the module).

    ``device``: the CUDA device the copies will go to (registration belongs to the context
    current while it is made; default: the current device).

    Returns:
        the registration, and per tensor a flat uint8 tensor holding its bytes in page-locked
        memory, to copy from (the tensor itself when it is already pinned, a device tensor
        itself), or ``None`` where it was not locked: memory that is not a file's (see the
        module: the caller moves it with :func:`locked_storage` or pins a copy), or where locking
        failed (a warning says so).
    """
    from ._filemap import shared_views

    reg = HostRegistration()
    # a non-contiguous tensor has no one range to lock (nor a flat view): the caller copies it
    flat = [t.reshape(-1).view(torch.uint8) if t.is_contiguous() else None for t in tensors]
    sources: list[torch.Tensor | None] = [
        f if f is not None and (t.device.type != "cpu" or t.is_pinned()) else None
        for t, f in zip(tensors, flat)]
    todo = [i for i, s in enumerate(sources) if s is None and flat[i] is not None]
    if not todo or not torch.cuda.is_available():
        return reg, sources
    views, files = shared_views([tensors[i] for i in todo])
    # only a file's pages, through our own shared mapping of it: no other allocation shares them
    candidates = {i: v for i, v in zip(todo, views) if v is not None}
    if not candidates:
        return reg, sources
    with _on(device):
        _register(torch.cuda.cudart(), _merged_ranges(list(candidates.values())), reg)
    for i, c in candidates.items():
        if reg.covers(c.data_ptr(), c.numel()):
            sources[i] = c
    # registered memory must outlive the registration: the tensors, the shared mappings
    reg._keep = [*tensors, *candidates.values(), *files]
    reg.remapped_bytes = sum(s.numel() for i, s in candidates.items() if sources[i] is s)
    if any(sources[i] is None for i in candidates):
        warnings.warn("ggufvideo.offload: cudaHostRegister failed for some host weights; "
                      "pinning copies of them instead (host memory grows by their size)",
                      stacklevel=3)
    return reg, sources


def _on(device: torch.device | None) -> Any:
    """The context that makes ``device`` current (registration belongs to the current one)."""
    if device is not None and device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def locked_storage(raw: torch.Tensor, reg: HostRegistration,
                   device: torch.device | None = None) -> torch.Tensor | None:
    """Move the contiguous CPU tensor ``raw``'s bytes into page-locked memory of its own.

    The bytes are copied into an anonymous mapping made for them (whole pages no other
    allocation uses), which is locked and recorded in ``reg``; ``raw`` is then set to that
    memory (``raw.data = ...``: the same tensor object, so whoever holds it sees the move; its
    old memory is freed with its last other reference). After :meth:`HostRegistration.release`
    the memory is ordinary memory that ``raw`` owns. Returns ``raw``, or ``None`` (``raw``
    untouched) when the memory could not be locked.
    """
    nbytes = raw.numel() * raw.element_size()
    if nbytes == 0 or not raw.is_contiguous() or raw.device.type != "cpu":
        return None
    if reg.covers(raw.data_ptr(), nbytes):
        return raw  # moved already (a second parameter over the same blocks)
    # anonymous memory, whole pages of its own (private where the platform has the flag: what
    # malloc hands out for big blocks)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    private = getattr(mmap, "MAP_PRIVATE", None)
    anonymous = getattr(mmap, "MAP_ANONYMOUS", None)
    arena = (mmap.mmap(-1, size, flags=private | anonymous)
             if private is not None and anonymous is not None else mmap.mmap(-1, size))
    buf = torch.frombuffer(arena, dtype=torch.uint8)  # holds the mapping for its lifetime
    buf[:nbytes].copy_(raw.reshape(-1).view(torch.uint8))
    start = buf.data_ptr()
    before = len(reg.ranges)
    with _on(device):
        _register(torch.cuda.cudart(), [(start, start + len(arena))], reg)
    if len(reg.ranges) == before:
        return None
    reg.moved_bytes += len(arena)
    reg._keep.append(buf)  # locked memory outlives its registration, whatever becomes of raw
    raw.data = buf[:nbytes].view(raw.dtype).view(raw.shape)
    return raw
