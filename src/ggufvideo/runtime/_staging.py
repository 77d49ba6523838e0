"""Host memory the GPU can copy from asynchronously, without a second copy of the weights.

Host-to-device copies run at full speed (and off the compute stream) only from page-locked
memory. Instead of pinning a *copy* of every streamed weight (twice the file in RAM), the host
tensors themselves are registered with ``cudaHostRegister``: page-aligned ranges covering them are
merged and locked in place. For weights memory-mapped from a GGUF file that is the page cache
itself (registered read-only, so the private mapping's pages are not copied on write). Where
registration fails (an old driver, a locked-memory limit), the host tensor is replaced by a pinned
copy, and :attr:`HostRegistration.copied_bytes` says how much was copied.
"""

from __future__ import annotations

import mmap
import warnings

import torch

__all__ = ["HostRegistration", "register_host"]

_READ_ONLY = 8  # cudaHostRegisterReadOnly
_DEFAULT = 0


class HostRegistration:
    """Page-locked host ranges; :meth:`release` unregisters them (also on garbage collection)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.registered_bytes = 0
        self.copied_bytes = 0
        self._keep: list[torch.Tensor] = []

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


def register_host(tensors: list[torch.Tensor]) -> tuple[HostRegistration, list[bool]]:
    """Page-lock the memory of plain CPU ``tensors`` in place.

    Returns:
        the registration, and per tensor whether it is now page-locked (already pinned tensors
        count as locked; the caller pins a copy of the others).
    """
    reg = HostRegistration()
    todo = [t for t in tensors if t.device.type == "cpu" and not t.is_pinned()]
    ok_ranges: list[tuple[int, int]] = []
    if todo and torch.cuda.is_available():
        rt = torch.cuda.cudart()
        for start, end in _merged_ranges(todo):
            ok = False
            for flags in (_READ_ONLY, _DEFAULT):
                ok = int(rt.cudaHostRegister(start, end - start, flags)) == 0
                if ok:
                    break
                _clear_cuda_error()  # else the next kernel-launch check reports it
            if ok:
                ok_ranges.append((start, end))
                reg.registered_bytes += end - start
        reg.ranges = ok_ranges
        reg._keep = todo  # registered memory must outlive the registration
    locked = []
    for t in tensors:
        if t.device.type != "cpu" or t.is_pinned():
            locked.append(True)
            continue
        p, n = t.data_ptr(), t.numel() * t.element_size()
        locked.append(any(s <= p and p + n <= e for s, e in ok_ranges))
    if todo and not all(locked):
        warnings.warn("ggufvideo.offload: cudaHostRegister failed for some host weights; "
                      "pinning copies of them instead (host memory grows by their size)",
                      stacklevel=3)
    return reg, locked
