"""Host memory the GPU can copy from asynchronously, without a second copy of the weights.

Host-to-device copies run at full speed (and off the compute stream) only from page-locked
memory. Instead of pinning a *copy* of every streamed weight (twice the file in RAM), the host
memory is registered with ``cudaHostRegister``: page-aligned ranges are merged and locked. For
weights memory-mapped from a GGUF file that is the page cache itself, locked through a shared
read-only mapping of the file (locking the private mapping the tensors view would give the
process a copy of every page: :mod:`._filemap`); other host tensors are locked in place. Where
registration fails (an old driver, a locked-memory limit), the host tensor is replaced by a
pinned copy, and :attr:`HostRegistration.copied_bytes` says how much was copied.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from typing import Any

import torch

__all__ = ["HostRegistration", "register_host"]

_READ_ONLY = 8  # cudaHostRegisterReadOnly
_DEFAULT = 0


class HostRegistration:
    """Page-locked host ranges; :meth:`release` unregisters them (also on garbage collection)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.registered_bytes = 0
        #: of those, bytes locked through a shared mapping of their file (not in place)
        self.remapped_bytes = 0
        self.copied_bytes = 0
        self._keep: list[object] = []

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
            reg.ranges.append((start, end))
            reg.registered_bytes += end - start


def register_host(tensors: list[torch.Tensor], device: torch.device | None = None
                  ) -> tuple[HostRegistration, list[torch.Tensor | None]]:
    """Page-lock the memory of plain CPU ``tensors`` without copying them.

    A tensor privately mapped from a file (a GGUF file's weights) whose pages are still the
    file's is locked through a shared read-only mapping of the same bytes (see
    :mod:`._filemap`: locking the private mapping would copy every page); any other tensor is
    locked in place.

    ``device``: the CUDA device the copies will go to (registration belongs to the context
    current while it is made; default: the current device).

    Returns:
        the registration, and per tensor a flat uint8 tensor holding its bytes in page-locked
        memory, to copy from (the tensor itself when it was locked in place or already pinned,
        a device tensor itself), or ``None`` where locking failed (the caller pins a copy).
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
    candidates: dict[int, torch.Tensor] = {}
    for i, v in zip(todo, views):
        f = flat[i]
        assert f is not None
        candidates[i] = v if v is not None else f
    on_device = (torch.cuda.device(device) if device is not None and device.type == "cuda"
                 and device.index is not None else contextlib.nullcontext())
    with on_device:
        _register(torch.cuda.cudart(), _merged_ranges(list(candidates.values())), reg)
    for i, c in candidates.items():
        p, n = c.data_ptr(), c.numel()
        if any(s <= p and p + n <= e for s, e in reg.ranges):
            sources[i] = c
    # registered memory must outlive the registration: the tensors, the shared mappings
    reg._keep = [*tensors, *candidates.values(), *files]
    reg.remapped_bytes = sum(s.numel() for i, s in candidates.items()
                             if sources[i] is s and s.data_ptr() != tensors[i].data_ptr())
    if any(s is None for s in sources):
        warnings.warn("ggufvideo.offload: cudaHostRegister failed for some host weights; "
                      "pinning copies of them instead (host memory grows by their size)",
                      stacklevel=3)
    return reg, sources
