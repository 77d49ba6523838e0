"""The same bytes as a file-mapped host tensor, in a *shared* read-only mapping of that file.

Why: a GGUF file is mapped private (copy-on-write), so that tensors can be writable views that
never touch the file. Page-locking a private mapping for the GPU, even read-only, makes the
kernel give the process its own copy of every page: measured on a lent H100 host (Linux 6.18),
registering 2 GiB of a private mapping grew the process's anonymous memory by 2 GiB and ran at
~2 GB/s, where the same 2 GiB of a shared read-only mapping locked the page cache itself with no
growth at 16-20 GB/s. Streaming copies therefore read from a shared mapping of the same file
range, wherever the private pages are still the file's own: ``/proc/self/pagemap`` says each
page is either not yet faulted in or a page-cache page (a page written to since has become
anonymous, and such a tensor keeps its own memory as the copy source).

Linux only (``/proc``); elsewhere, or for memory that is not a mapped file, nothing is remapped.
"""

from __future__ import annotations

import bisect
import mmap
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["file_mappings", "shared_views"]

_PRESENT = 1 << 63
_SWAPPED = 1 << 62
_FILE = 1 << 61  # a file page (or shared anonymous memory)


@dataclass(frozen=True)
class Mapping:
    """One private file mapping of this process (a line of ``/proc/self/maps``)."""

    start: int
    end: int
    offset: int  # of ``start`` in the file
    dev: tuple[int, int]
    inode: int
    path: str


def file_mappings(maps: str = "/proc/self/maps") -> list[Mapping]:
    """This process's private mappings of regular files, by start address."""
    out: list[Mapping] = []
    try:
        with open(maps) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith(" (deleted)"):
            continue
        span, perms, offset, dev, inode, path = parts
        if len(perms) < 4 or perms[3] != "p" or perms[0] != "r":
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        major, minor = (int(x, 16) for x in dev.split(":"))
        out.append(Mapping(lo, hi, int(offset, 16), (major, minor), int(inode), path))
    out.sort(key=lambda m: m.start)
    return out


def _unmodified(start: int, nbytes: int, pagemap: Any) -> bool:
    """Whether every page of ``[start, start + nbytes)`` is absent or a page-cache page."""
    page = mmap.PAGESIZE
    first, last = start // page, (start + nbytes - 1) // page
    pagemap.seek(first * 8)
    raw = pagemap.read((last - first + 1) * 8)
    if len(raw) != (last - first + 1) * 8:
        return False
    flags = np.frombuffer(raw, dtype=np.uint64)
    present = (flags & np.uint64(_PRESENT)) != 0
    file_page = (flags & np.uint64(_FILE)) != 0
    swapped = (flags & np.uint64(_SWAPPED)) != 0
    return not bool(np.any((present & ~file_page) | swapped))


class _SharedFile:
    """A shared read-only mapping of one file and a flat uint8 tensor over it."""

    def __init__(self, m: Mapping) -> None:
        fd = os.open(m.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            # inode only: /proc/self/maps shows the superblock's device, which stat's st_dev
            # differs from on btrfs subvolumes and overlayfs
            if st.st_ino != m.inode or st.st_size == 0:
                raise OSError(f"{m.path}: not the file that is mapped (replaced since?)")
            self.mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # MAP_SHARED
        finally:
            os.close(fd)
        self.size = st.st_size
        with warnings.catch_warnings():
            # read-only memory: this tensor and its views are copy sources, never written
            warnings.simplefilter("ignore")
            self.bytes = torch.frombuffer(self.mm, dtype=torch.uint8)


def shared_views(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[Any]]:
    """Per tensor, a flat uint8 view of the same bytes in a shared read-only mapping of the file
    it is privately mapped from, or ``None`` (not file-backed, pages written to, no ``/proc``).

    Returns the views and the shared mappings they live in (keep them while the views are used).
    """
    views: list[torch.Tensor | None] = [None] * len(tensors)
    maps = file_mappings()
    if not maps:
        return views, []
    starts = [m.start for m in maps]
    shared: dict[tuple[str, int], _SharedFile | None] = {}
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return views, []
    with pagemap:
        for i, t in enumerate(tensors):
            n = t.numel() * t.element_size()
            if t.device.type != "cpu" or n == 0 or not t.is_contiguous():
                continue
            p = t.data_ptr()
            j = bisect.bisect_right(starts, p) - 1
            if j < 0 or p + n > maps[j].end:
                continue
            m = maps[j]
            if not _unmodified(p, n, pagemap):
                continue
            key = (m.path, m.inode)
            if key not in shared:
                try:
                    shared[key] = _SharedFile(m)
                except (OSError, ValueError):
                    shared[key] = None
            sf = shared[key]
            at = m.offset + (p - m.start)
            if sf is None or at + n > sf.size:
                continue
            views[i] = sf.bytes[at:at + n]
    return views, [sf for sf in shared.values() if sf is not None]
