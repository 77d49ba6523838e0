"""Probe of the host-to-device staging choices behind ``load_model(..., device="cuda")``
(``ggufvideo.runtime._upload``), without the library's bookkeeping: what a file in the page
cache can be copied to the GPU at, and how.

Run on a CUDA machine: ``python benchmarks/gpu_staging_probe.py --gib 8 --out DIR``. It writes a
``--gib`` file to ``/dev/shm`` (in the page cache by construction) and prints, against one pinned
``copy_`` of the same size:

- ``register``: ``cudaHostRegister`` of a shared read-only mapping of the file, by 1-8 threads
  in 16-256 MiB ranges, and ``cudaHostUnregister`` of them (GB/s of file covered);
- ``claim`` / ``fixed``: 16 reader threads, each owning two 4 MiB pinned buffers, ``os.preadv``
  into one, ``cudaMemcpyAsync`` out of it (libcudart through ctypes, the GIL released), an event
  before it is refilled; chunks handed to whichever reader is free (``claim``, what the library
  does) or every 16th chunk per reader (``fixed``);
- ``hybrid``: readers from the front of the file and "registrars" from the back (register a
  range, copy it, unregister it once the copy passed), meeting in the middle.

What one H100 host (16 cores, torch 2.11.0+cu130, pinned copy 55 GB/s) gave, 8 GiB:
registration does not scale with threads (20-25 GB/s at 1-8 threads in 64-256 MiB ranges;
16 MiB ranges 10 GB/s on one thread); register-copy-unregister 12-18 GB/s, and mixed with
readers it slows them (13-21 GB/s in all, the readers alone 44-50), so the library's readers do
not register. Claiming: 48-51 GB/s, fixed shares 46-49 (three alternating rounds, best three of
four copies each).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_dequant import pinned_h2d_bandwidth  # noqa: E402

from ggufvideo.runtime import _cudart  # noqa: E402

READ_ONLY = 8  # cudaHostRegisterReadOnly
PAGE = mmap.PAGESIZE


def _check(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"{what} failed: cudaError {rc}")


def _run_threads(work: list[tuple[Callable[[int], None], int]]) -> None:
    """Run ``fn(r)`` for each ``(fn, r)`` in a thread of its own; wait for them all."""
    pool = [threading.Thread(target=fn, args=(r,)) for fn, r in work]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


class Probe:
    def __init__(self, gib: float) -> None:
        self.path = "/dev/shm/ggufvideo_staging_probe.bin"
        self.size = int(gib * 2**30) // (1 << 27) * (1 << 27)  # whole 128 MiB pieces
        pattern = np.arange(1 << 24, dtype=np.uint64).tobytes()
        with open(self.path, "wb") as fh:
            for _ in range(self.size // len(pattern)):
                fh.write(pattern)
        torch.cuda.init()
        rt = _cudart.lib()
        if rt is None:
            raise SystemExit("no shared libcudart loaded: nothing to probe")
        vp = ctypes.c_void_p
        rt.cudaHostRegister.argtypes = [vp, ctypes.c_size_t, ctypes.c_uint]
        rt.cudaHostUnregister.argtypes = [vp]
        self.rt = rt
        self.fd = os.open(self.path, os.O_RDONLY)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.base = np.frombuffer(self.mm, dtype=np.uint8).ctypes.data
        self.dst = torch.empty(self.size, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()

    def close(self) -> None:
        os.close(self.fd)
        os.remove(self.path)

    def pinned(self) -> float:
        return round(pinned_h2d_bandwidth(self.dst), 1)

    def register(self, threads: int, chunk: int) -> tuple[float, float]:
        """GB/s of registering, then of unregistering, the whole file in ``chunk`` ranges."""
        starts = [self.base + k * chunk for k in range(self.size // chunk)]

        def register(r: int) -> None:
            for p in starts[r::threads]:
                _check(self.rt.cudaHostRegister(p, chunk, READ_ONLY), "cudaHostRegister")

        def unregister(r: int) -> None:
            for p in starts[r::threads]:
                _check(self.rt.cudaHostUnregister(p), "cudaHostUnregister")

        rates = []
        for fn in (register, unregister):
            t0 = time.perf_counter()
            _run_threads([(fn, r) for r in range(threads)])
            rates.append(round(self.size / (time.perf_counter() - t0) / 1e9, 1))
        return rates[0], rates[1]

    def copy(self, readers: int, registrars: int, *, claim: bool = True, chunk: int = 4 << 20,
             range_bytes: int = 64 << 20, slots: int = 2) -> tuple[float, float]:
        """(GB/s, share of the file the registrars moved) of one copy of the whole file."""
        rt, size, base, S = self.rt, self.size, self.base, self.stream.cuda_stream
        lock = threading.Lock()
        cursor = [0, size]  # readers take from the front, registrars from the back
        moved = [0, 0]
        ring = torch.empty(max(1, readers) * slots * chunk, dtype=torch.uint8).pin_memory()
        ring_np, rp, dp = ring.numpy(), ring.data_ptr(), self.dst.data_ptr()

        def take(front: bool, want: int) -> tuple[int, int] | None:
            with lock:
                lo, hi = cursor
                if lo >= hi:
                    return None
                n = min(want, hi - lo)
                if front:
                    cursor[0] = lo + n
                    return lo, n
                cursor[1] = hi - n
                return hi - n, n

        def event() -> ctypes.c_void_p:
            ev = ctypes.c_void_p()
            _check(rt.cudaEventCreateWithFlags(ctypes.byref(ev), 2), "cudaEventCreate")
            return ev

        def reader(r: int) -> None:
            rt.cudaSetDevice(torch.cuda.current_device())
            events, used = [event() for _ in range(slots)], [False] * slots
            mine = iter(range(r * chunk, size, readers * chunk))
            j = 0
            while True:
                if claim:
                    got = take(True, chunk)
                else:
                    off = next(mine, None)
                    got = None if off is None else (off, min(chunk, size - off))
                if got is None:
                    break
                off, n = got
                s = j % slots
                j += 1
                if used[s]:
                    rt.cudaEventSynchronize(events[s])
                at = (r * slots + s) * chunk
                view, done = ring_np[at:at + n].data, 0
                while done < n:
                    done += os.preadv(self.fd, [view[done:]], off + done)
                _check(rt.cudaMemcpyAsync(dp + off, rp + at, n, 1, S), "cudaMemcpyAsync")
                rt.cudaEventRecord(events[s], S)
                used[s] = True
                with lock:
                    moved[0] += n
            for s in range(slots):
                if used[s]:
                    rt.cudaEventSynchronize(events[s])

        def registrar(r: int) -> None:
            rt.cudaSetDevice(torch.cuda.current_device())
            events, held = [event() for _ in range(slots)], [0] * slots
            j = 0
            while (got := take(False, range_bytes)) is not None:
                off, n = got
                s = j % slots
                j += 1
                if held[s]:
                    rt.cudaEventSynchronize(events[s])
                    _check(rt.cudaHostUnregister(held[s]), "cudaHostUnregister")
                lo = (base + off) // PAGE * PAGE
                hi = -(-(base + off + n) // PAGE) * PAGE
                _check(rt.cudaHostRegister(lo, hi - lo, READ_ONLY), "cudaHostRegister")
                held[s] = lo
                _check(rt.cudaMemcpyAsync(dp + off, base + off, n, 1, S), "cudaMemcpyAsync")
                rt.cudaEventRecord(events[s], S)
                with lock:
                    moved[1] += n
            for s in range(slots):
                if held[s]:
                    rt.cudaEventSynchronize(events[s])
                    _check(rt.cudaHostUnregister(held[s]), "cudaHostUnregister")

        t0 = time.perf_counter()
        _run_threads([(reader, r) for r in range(readers)]
                     + [(registrar, r) for r in range(registrars)])
        self.stream.synchronize()
        return (round(size / (time.perf_counter() - t0) / 1e9, 1),
                round(moved[1] / size, 2))

    def verify(self) -> None:
        """The device copy holds the file's bytes (both ends)."""
        host = np.frombuffer(self.mm, dtype=np.uint8)
        for lo in (0, self.size - (1 << 26)):
            want = torch.from_numpy(host[lo:lo + (1 << 26)].copy())
            assert torch.equal(self.dst[lo:lo + (1 << 26)].cpu(), want), f"bytes differ at {lo}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=8)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    p = Probe(args.gib)
    res: dict[str, object] = {"file_gib": p.size / 2**30, "pinned_gbs": p.pinned()}
    print(res, flush=True)
    try:
        for threads in (1, 2, 4, 8):
            for mib in (16, 64, 256):
                reg, unreg = p.register(threads, mib << 20)
                res[f"register_{threads}t_{mib}MiB_gbs"] = reg
                res[f"unregister_{threads}t_{mib}MiB_gbs"] = unreg
        print({k: v for k, v in res.items() if "register" in k}, flush=True)
        for _round in range(3):  # alternating, so drift on the machine hits both alike
            for claim in (True, False):
                rates = sorted(p.copy(16, 0, claim=claim)[0] for _ in range(4))
                key = "readers_claim_gbs" if claim else "readers_fixed_gbs"
                res.setdefault(key, []).extend(rates[1:])  # type: ignore[union-attr]
                print(key, rates, flush=True)
        for readers, registrars, mib in [(0, 1, 64), (0, 2, 64), (0, 4, 64), (0, 4, 16),
                                         (0, 8, 64), (15, 1, 64), (14, 2, 64), (12, 4, 64),
                                         (12, 4, 16), (16, 2, 64), (8, 8, 64), (12, 4, 256)]:
            runs = sorted(p.copy(readers, registrars, range_bytes=mib << 20) for _ in range(4))
            res[f"hybrid_{readers}r_{registrars}reg_{mib}MiB"] = runs[1:]
            print(f"{readers} readers + {registrars} registrars ({mib} MiB): "
                  "(GB/s, registrars' share)", runs, flush=True)
        p.verify()
    finally:
        p.close()
    print(json.dumps(res))
    with open(os.path.join(args.out, "staging_probe.json"), "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
