"""``load_model(..., device="cuda")`` at host-to-device bandwidth: a file's tensors copied to the
GPU through page-locked staging instead of one pageable ``.to(device)`` per tensor.

A pageable copy goes through the driver's own small bounce buffer, one tensor at a time, at a
fraction of the link's speed. Two ways around it, chosen by :data:`MODE` (environment variable
``GGUFVIDEO_UPLOAD``; ``benchmarks/gpu_offload.py --load`` times each):

``"read"`` (default)
    A ring of :data:`BUFFERS` pinned buffers of :data:`CHUNK_BYTES`. Reader threads fill them
    straight from the file (``os.preadv`` from the page cache: no page faults on the memory map)
    while the GPU copies the chunks filled before, asynchronously, on a side stream; a buffer is
    refilled once the copy out of it has completed (its event). The file is read in offset order,
    neighbouring tensors in one run.
``"register"``
    The memory-mapped ranges are page-locked in place with ``cudaHostRegister`` (read-only, the
    staging :func:`ggufvideo.offload` uses), copied asynchronously, then unregistered.
``"plain"``
    ``.to(device)`` per tensor (what ``load_model`` did before).

Tensors not backed by the file (joined by a layout renaming) and non-contiguous ones are copied
with ``.to(device)``. The bytes are the file's: results are identical whichever way they went.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..tensor import GGMLTensor

__all__ = ["MODE", "Chunk", "plan_chunks", "upload", "upload_state", "use_fast_upload"]

MODE = os.environ.get("GGUFVIDEO_UPLOAD", "read")
CHUNK_BYTES = 32 << 20
BUFFERS = 4
READERS = 4
#: Tensors closer than this in the file are read as one run (the alignment padding is read too).
MAX_GAP = 1 << 16


@dataclass
class Chunk:
    """A contiguous range of the file, read into one staging buffer and copied out in pieces."""

    offset: int  # in the file
    nbytes: int
    #: (offset in the chunk, tensor index, offset in the tensor, bytes)
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)


def plan_chunks(spans: list[tuple[int, int]], chunk_bytes: int | None = None,
                max_gap: int | None = None) -> list[Chunk]:
    """Cut the file ranges ``spans`` (``(offset, nbytes)`` per tensor) into chunks of at most
    ``chunk_bytes``, in file order. A tensor may span chunks (it gets a piece in each); ranges
    that overlap (views of one another) each get their pieces."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    max_gap = MAX_GAP if max_gap is None else max_gap
    order = sorted((i for i, (_, n) in enumerate(spans) if n > 0), key=lambda i: spans[i][0])
    runs: list[tuple[int, int, list[int]]] = []
    for i in order:
        s, n = spans[i]
        if runs and s <= runs[-1][1] + max_gap:
            start, end, idx = runs[-1]
            idx.append(i)
            runs[-1] = (start, max(end, s + n), idx)
        else:
            runs.append((s, s + n, [i]))
    chunks: list[Chunk] = []
    for start, end, idx in runs:
        first = 0
        pos = start
        while pos < end:
            stop = min(end, pos + chunk_bytes)
            chunk = Chunk(pos, stop - pos)
            while first < len(idx) and sum(spans[idx[first]]) <= pos:
                first += 1  # everything before ``first`` ended before this chunk
            for i in idx[first:]:
                s, n = spans[i]
                if s >= stop:
                    break
                lo, hi = max(s, pos), min(s + n, stop)
                if lo < hi:
                    chunk.pieces.append((lo - pos, i, lo - s, hi - lo))
            chunks.append(chunk)
            pos = stop
    return chunks


class CudaStaging:
    """The device side: pinned buffers, async copies on a side stream, events. Tests replace it
    with one that copies on the CPU and records the order of events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def record(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def wait(self, event: Any) -> None:
        """The host waits for ``event`` (a staging buffer is free again)."""
        event.synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


def use_fast_upload(device: torch.device) -> bool:
    """Whether ``load_model`` copies to ``device`` through staging (a CUDA device, not "plain")."""
    return device.type == "cuda" and MODE != "plain" and torch.cuda.is_available()


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.raw if isinstance(t, GGMLTensor) else t


def _rebuild(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``t`` with its bytes now in the uint8 tensor ``flat`` (on the device)."""
    if isinstance(t, GGMLTensor):
        return GGMLTensor(flat.view(t.raw.dtype).view(t.raw.shape), t.qtype, t.shape, t.dtype)
    return flat.view(t.dtype).view(t.shape)


def _read_into(fd: int, offset: int, out: np.ndarray, path: str) -> None:
    view = out.data  # a memoryview of the pinned buffer
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise OSError(f"{path}: short read at offset {offset + got} while loading to the GPU "
                          "(the file changed or was truncated?)")
        got += n


def upload(tensors: list[torch.Tensor], device: torch.device, *, path: str | None = None,
           base: int | None = None, size: int | None = None, mode: str | None = None,
           staging: Any = None) -> list[torch.Tensor]:
    """``tensors`` (host tensors, :class:`GGMLTensor` or plain) copied to ``device``, same bytes.

    ``path``/``base``/``size``: the file the tensors are memory-mapped from, the address its
    first byte is mapped at and its length ("read" mode reads the file; without them, or for a
    tensor outside it, the tensor is copied with ``.to``). ``staging``: the device side
    (default :class:`CudaStaging`).
    """
    mode = mode or MODE
    if mode == "plain":
        return [t.to(device) for t in tensors]
    st = staging or CudaStaging(device)
    raws = [_raw(t) for t in tensors]
    fast = [r.device.type == "cpu" and r.is_contiguous() for r in raws]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    if mode == "read" and path is not None and base is not None and size is not None:
        spans: list[tuple[int, int]] = []
        for i, r in enumerate(raws):
            off, n = r.data_ptr() - base, r.numel() * r.element_size()
            if not (fast[i] and 0 <= off and off + n <= size):
                fast[i] = False
            spans.append((off, n) if fast[i] else (0, 0))
        flats = [st.empty(n) if fast[i] else None for i, (_, n) in enumerate(spans)]
        _read_staged(plan_chunks(spans), flats, st, path)
    elif mode in ("read", "register"):
        flats = [st.empty(r.numel() * r.element_size()) if fast[i] else None
                 for i, r in enumerate(raws)]
        _copy_registered(raws, flats, st)
    else:
        raise ValueError(f"ggufvideo.runtime._upload: unknown mode {mode!r} (GGUFVIDEO_UPLOAD "
                         "must be read, register or plain)")
    for i, t in enumerate(tensors):
        flat = flats[i]
        out[i] = _rebuild(t, flat) if flat is not None else t.to(device)
    return [t for t in out if t is not None]


def _read_staged(chunks: list[Chunk], flats: list[torch.Tensor | None], st: Any,
                 path: str) -> None:
    if not chunks:
        return
    nbuf = min(BUFFERS, len(chunks))
    size = max(c.nbytes for c in chunks)
    bufs = [st.pinned(size) for _ in range(nbuf)]
    arrays = [b.numpy() for b in bufs]
    freed: list[Any] = [None] * nbuf  # event after the last copy out of each buffer
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            def fill(k: int, wait_for: Any) -> None:
                if wait_for is not None:
                    st.wait(wait_for)  # the copies out of this buffer are done
                c = chunks[k]
                _read_into(fd, c.offset, arrays[k % nbuf][:c.nbytes], path)

            pending = {k: pool.submit(fill, k, None) for k in range(nbuf)}
            for k, c in enumerate(chunks):
                pending.pop(k).result()
                buf = bufs[k % nbuf]
                for at, i, into, n in c.pieces:
                    dst = flats[i]
                    assert dst is not None
                    st.copy(dst[into:into + n], buf[at:at + n])
                freed[k % nbuf] = st.record()
                if k + nbuf < len(chunks):
                    pending[k + nbuf] = pool.submit(fill, k + nbuf, freed[k % nbuf])
            st.finish()
    finally:
        os.close(fd)


def _copy_registered(raws: list[torch.Tensor], flats: list[torch.Tensor | None], st: Any) -> None:
    from ._staging import register_host

    todo = [r for r, f in zip(raws, flats) if f is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unregistered ones are copied from pageable memory
        reg, _ = register_host([r.reshape(-1).view(torch.uint8) for r in todo])
    try:
        for r, f in zip(raws, flats):
            if f is not None:
                st.copy(f, r.reshape(-1).view(torch.uint8))
        st.finish()
    finally:
        reg.release()


def file_span(file: Any) -> tuple[str, int, int] | None:
    """``(path, address of byte 0, size)`` of an open :class:`~ggufvideo.reader.GGUFFile`'s
    mapping, or ``None`` for a file without tensors."""
    info = next((i for i in file.tensors.values() if i.nbytes), None)
    if info is None:
        return None
    base = file.tensor_data(info).data_ptr() - info.offset
    return str(file.path), base, int(file.size)


def upload_state(sd: Mapping[str, torch.Tensor], keys: list[str], device: torch.device,
                 file: Any, *, staging: Any = None) -> dict[str, torch.Tensor]:
    """``sd`` with the tensors under ``keys`` copied to ``device`` in one staged pass (a tensor
    that appears under several keys is copied once)."""
    order: list[torch.Tensor] = []
    index: dict[int, int] = {}
    for k in keys:
        t = sd[k]
        if id(t) not in index and t.device.type == "cpu":
            index[id(t)] = len(order)
            order.append(t)
    span = file_span(file) if file is not None else None
    path, base, size = span if span is not None else (None, None, None)
    moved = upload(order, device, path=path, base=base, size=size, staging=staging)
    out = dict(sd)
    for k in keys:
        j = index.get(id(sd[k]))
        if j is not None:
            out[k] = moved[j]
    return out
