"""``load_model(..., device="cuda")`` at host-to-device bandwidth: a file's tensors copied to the
GPU through page-locked staging instead of one pageable ``.to(device)`` per tensor.

A pageable copy goes through the driver's own small bounce buffer, one tensor at a time, at a
fraction of the link's speed. Two ways around it, chosen by :data:`MODE` (environment variable
``GGUFVIDEO_UPLOAD``; ``benchmarks/gpu_offload.py --load`` times each):

``"read"`` (default)
    :data:`READERS` threads each own pinned buffers of :data:`CHUNK_BYTES` and claim the file's
    chunks in offset order, the next one to whichever reader is free (neighbouring tensors in
    one run). A reader fills a buffer straight from the file (``os.preadv`` from the page
    cache: no page faults on the memory map) and queues the copies out of it. By default
    (:data:`SYNC_LANES`) each reader copies on a stream of its own and waits for a chunk's
    copies before reading the next into its one buffer; otherwise the readers share one side
    stream, own :data:`BUFFERS` buffers each and record an event per chunk, refilling a buffer
    once its event has passed. Many readers because one thread copies out of the page cache at
    ~5-7 GB/s. Copies, events and waits go through ``libcudart`` (:mod:`._cudart`) when it is
    loaded, so issuing them does not hold the GIL the other readers need; each such call still
    gives the GIL up and takes it back. 8 MiB chunks did better than 4 MiB on both H100 hosts
    compared; a stream per reader tied with events at 8 MiB, makes one call less per chunk (a
    stream wait instead of an event record and a later event wait) and needs one buffer instead
    of two (README, "Loading straight to the GPU").
``"register"``
    The file's ranges are page-locked with ``cudaHostRegister`` (through a shared read-only
    mapping: the staging :func:`ggufvideo.offload` uses), copied asynchronously, then
    unregistered.
``"plain"``
    ``.to(device)`` per tensor (what ``load_model`` did before).

Tensors not backed by the file (joined by a layout renaming) and non-contiguous ones are copied
with ``.to(device)``. The bytes are the file's: results are identical whichever way they went.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..tensor import GGMLTensor
from ._lanes import CudaStaging

__all__ = ["MODE", "Chunk", "ChunkPlan", "plan_chunks", "upload", "upload_state", "use_fast_upload"]

MODE = os.environ.get("GGUFVIDEO_UPLOAD", "read")
CHUNK_BYTES = 8 << 20
#: Pinned buffers per reader thread.
BUFFERS = 2
#: Reader threads (one per core, at most 16: one reader copies ~5 GB/s out of the page cache,
#: 16 came closest to the ~55 GB/s of a pinned copy on an H100 host).
READERS = max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count() or 1))
#: Issue "read" mode's copies through libcudart when it is loaded (else torch's calls).
USE_CUDART = True
#: libcudart lanes: each reader copies on a stream of its own and waits for a chunk's copies
#: right after queuing them (one buffer per reader), instead of events on one shared stream.
SYNC_LANES = True
#: Tensors closer than this in the file are read as one run (the alignment padding is read too).
MAX_GAP = 1 << 16
#: Make the device buffers as views of one allocation (one cudaMalloc) instead of one each.
#: A candidate for a first load's one-time cost (a fresh process's allocator has no segments:
#: every buffer is a cudaMalloc); not the default until measured (``benchmarks/gpu_offload.py
#: --load`` times both). Its memory is given back only when every tensor in it is gone.
#: ``GGUFVIDEO_UPLOAD_ARENA=1`` turns it on.
ARENA = os.environ.get("GGUFVIDEO_UPLOAD_ARENA", "").strip().lower() in ("1", "true", "yes", "on")
#: Each buffer's offset in the arena is a multiple of this (as the caching allocator's blocks
#: are), so kernels reading raw blocks see the alignment they would in their own allocation.
ARENA_ALIGN = 512


@dataclass
class Chunk:
    """A contiguous range of the file, read into one staging buffer and copied out in pieces."""

    offset: int  # in the file
    nbytes: int
    #: (offset in the chunk, tensor index, offset in the tensor, bytes)
    pieces: list[tuple[int, int, int, int]] = field(default_factory=list)


class ChunkPlan:
    """The file ranges ``spans`` (``(offset, nbytes)`` per tensor) cut into chunks of at most
    ``chunk_bytes``, in file order; ranges closer than ``max_gap`` are read as one run. A tensor
    may span chunks (it gets a piece in each); ranges that overlap (views of one another) each
    get their pieces.

    The runs are found here (a sort of the tensors); the chunks are cut as they are iterated, so
    the readers of :func:`upload` cut them as they claim them: the first read does not wait for
    the whole plan (~2,000 chunks for 8 GiB, a few milliseconds of Python).
    """

    def __init__(self, spans: list[tuple[int, int]], chunk_bytes: int | None = None,
                 max_gap: int | None = None) -> None:
        self.spans = spans
        self.chunk_bytes = cb = chunk_bytes or CHUNK_BYTES
        gap = MAX_GAP if max_gap is None else max_gap
        order = sorted((i for i, (_, n) in enumerate(spans) if n > 0), key=lambda i: spans[i][0])
        self.runs: list[tuple[int, int, list[int]]] = []  # (start, end, tensors by offset)
        for i in order:
            s, n = spans[i]
            if self.runs and s <= self.runs[-1][1] + gap:
                start, end, idx = self.runs[-1]
                idx.append(i)
                self.runs[-1] = (start, max(end, s + n), idx)
            else:
                self.runs.append((s, s + n, [i]))
        #: How many chunks there are, and the largest one's bytes (a staging buffer's size).
        self.count = sum(-(-(end - start) // cb) for start, end, _ in self.runs)
        self.largest = min(cb, max((end - start for start, end, _ in self.runs), default=0))

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Chunk]:
        spans, cb = self.spans, self.chunk_bytes
        for start, end, idx in self.runs:
            first = 0
            pos = start
            while pos < end:
                stop = min(end, pos + cb)
                chunk = Chunk(pos, stop - pos)
                while first < len(idx) and sum(spans[idx[first]]) <= pos:
                    first += 1  # everything before ``first`` ended before this chunk
                for j in range(first, len(idx)):  # (no idx[first:]: a copy per chunk)
                    i = idx[j]
                    s, n = spans[i]
                    if s >= stop:
                        break
                    lo, hi = max(s, pos), min(s + n, stop)
                    if lo < hi:
                        chunk.pieces.append((lo - pos, i, lo - s, hi - lo))
                yield chunk
                pos = stop


def plan_chunks(spans: list[tuple[int, int]], chunk_bytes: int | None = None,
                max_gap: int | None = None) -> list[Chunk]:
    """Every chunk of :class:`ChunkPlan` ``(spans, chunk_bytes, max_gap)``, as a list."""
    return list(ChunkPlan(spans, chunk_bytes, max_gap))


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
    st = staging or CudaStaging(device, cudart=USE_CUDART, sync=SYNC_LANES)
    raws = [_raw(t) for t in tensors]
    fast = [r.device.type == "cpu" and r.is_contiguous() for r in raws]
    staged = mode == "read" and path is not None and base is not None and size is not None
    spans: list[tuple[int, int]] = []
    if staged:
        assert base is not None and size is not None
        for i, r in enumerate(raws):
            off, n = r.data_ptr() - base, r.numel() * r.element_size()
            if not (fast[i] and 0 <= off and off + n <= size):
                fast[i] = False
            spans.append((off, n) if fast[i] else (0, 0))
    elif mode not in ("read", "register"):
        raise ValueError(f"ggufvideo.runtime._upload: unknown mode {mode!r} (GGUFVIDEO_UPLOAD "
                         "must be read, register or plain)")
    # Every device buffer is made before any copy starts. Not by the readers as they reach a
    # tensor: a reader making a buffer and its tensor (Python under a lock) held up the others.
    # Side by side in one process on an H100 host (8 GiB, 582 tensors of 5120x5120 Q4_K): the
    # staged copy moved 32 GB/s with the buffers made in the readers (their summed wait to make
    # them: 1.3-1.5 s), 47 with them made up front (the ~3 ms of allocations included), where
    # bare readers with one preallocated buffer moved 51.
    flats = _device_buffers([r.numel() * r.element_size() if fast[i] else None
                             for i, r in enumerate(raws)], st)
    if staged:
        assert path is not None
        _read_staged(ChunkPlan(spans), flats, st, path)
    else:
        _copy_registered(raws, flats, st)
    return [t.to(device) if f is None else _rebuild(t, f) for t, f in zip(tensors, flats)]


def _device_buffers(sizes: list[int | None], st: Any) -> list[torch.Tensor | None]:
    """A device buffer of each size (``None``: none), one allocation each or views of one
    (:data:`ARENA`)."""
    if not ARENA:
        return [st.empty(n) if n is not None else None for n in sizes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        if n is not None:
            total += -(-n // ARENA_ALIGN) * ARENA_ALIGN
    arena = st.empty(total) if total else None
    return [arena[o:o + n] if n is not None and arena is not None else
            (st.empty(0) if n == 0 else None) for o, n in zip(offsets, sizes)]


class _Feed:
    """Hands out the plan's chunks in file order, each once, to whichever reader asks next (and
    cuts each as it is asked for).

    Not a fixed share per reader: a reader that the scheduler holds back (sixteen readers on
    sixteen cores share them with the caller and the driver's threads) would leave its share
    to finish alone at the end. On an H100 host (8 GiB from /dev/shm, 16 readers, 4 MiB chunks)
    claiming gave 48-51 GB/s where fixed shares gave 46-49 (benchmarks/gpu_staging_probe.py).
    """

    def __init__(self, plan: ChunkPlan) -> None:
        self.chunks = iter(plan)
        self.lock = threading.Lock()

    def next(self) -> Chunk | None:
        with self.lock:
            return next(self.chunks, None)


def _read_staged(plan: ChunkPlan, flats: list[torch.Tensor | None], st: Any, path: str) -> None:
    """Copy the plan's chunks of the file at ``path`` into the device buffers ``flats`` (by
    tensor index)."""
    if not plan.count:
        return
    readers = max(1, min(READERS, plan.count))
    # a lane that waits for each chunk's copies (SYNC_LANES) refills one buffer
    slots = 1 if getattr(st, "sync", False) else max(1, BUFFERS)
    size = plan.largest
    # Each reader page-locks its own buffers, in its own thread: the first read starts after
    # one reader's few MiB are locked, not after all of them (128 MiB for 16 readers, tens of
    # milliseconds on a first load, before the host allocator caches them). Held here, not in
    # the reader, until every queued copy out of them has passed (see _drain).
    rings: list[torch.Tensor | None] = [None] * readers
    stop = threading.Event()  # a reader failed: the others stop at their next chunk
    fd = os.open(path, os.O_RDONLY)
    claim = _Feed(plan)

    def work(r: int) -> None:
        lane = None
        try:
            lane = st.lane(slots)
            ring = rings[r] = st.pinned(slots * size)
            ring_np = ring.numpy()
            j = 0
            while (c := claim.next()) is not None:
                if stop.is_set():
                    return
                slot = j % slots
                j += 1
                lane.wait(slot)  # the copies out of this buffer are done
                at = slot * size
                _read_into(fd, c.offset, ring_np[at:at + c.nbytes], path)
                for piece_at, i, into, n in c.pieces:
                    lane.copy(flats[i], into, ring, at + piece_at, n)
                lane.record(slot)
        except BaseException:
            stop.set()
            raise
        finally:
            if lane is not None:
                lane.close()  # wait for the copies out of this reader's buffers

    try:
        with ThreadPoolExecutor(max_workers=readers) as pool:
            futures = [pool.submit(work, r) for r in range(readers)]
            try:
                for f in futures:
                    f.result()
            except BaseException:  # a reader failed, or Ctrl-C here: the others stop too
                stop.set()
                raise
        st.finish()
    except BaseException:
        _drain(st)  # copies queued after a lane's last event may still read a buffer
        raise
    finally:
        os.close(fd)


def _drain(st: Any) -> None:
    """Wait for every queued copy on the way out of an error (its own error is not the one to
    report)."""
    try:
        st.finish()
    except Exception:  # noqa: BLE001
        pass


def _copy_registered(raws: list[torch.Tensor], flats: list[torch.Tensor | None], st: Any) -> None:
    from ._staging import register_host

    todo = [(r, f) for r, f in zip(raws, flats) if f is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unregistered ones are copied from pageable memory
        reg, sources = register_host([r for r, _ in todo], st.device)
    try:
        for (r, f), src in zip(todo, sources):
            assert f is not None
            st.copy(f, src if src is not None else r.reshape(-1).view(torch.uint8))
        st.finish()
    except BaseException:
        _drain(st)  # the registered memory is released below: no copy may still read it
        raise
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
