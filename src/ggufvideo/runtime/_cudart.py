"""The few CUDA runtime calls torch has no Python binding for, made through the ``libcudart``
this process already loaded (``ctypes``).

Why not torch's ``copy_`` and ``torch.cuda.Event``: the staged upload's reader threads each issue
one copy and one event per few MiB, and through the dispatcher that is tens of microseconds with
the GIL held, which serialises sixteen readers. A ``ctypes`` call releases the GIL for the call's
duration, so the copies are issued in parallel with the reads. Where no shared ``libcudart`` is
loaded (a static build, a platform without ``/proc/self/maps``) :func:`lib` is ``None`` and the
callers use torch's own calls.
"""

from __future__ import annotations

import ctypes
import functools
import os

__all__ = ["CudaError", "check", "lib", "prefer_torchs"]

H2D = 1  # cudaMemcpyHostToDevice
EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking: no implicit sync with the legacy default stream


class CudaError(RuntimeError):
    """A CUDA runtime call made through :func:`lib` failed."""


@functools.lru_cache(maxsize=1)
def lib() -> ctypes.CDLL | None:
    """The loaded ``libcudart`` with argument types set, or ``None`` where there is none."""
    try:
        with open("/proc/self/maps") as fh:
            paths = list(dict.fromkeys(
                parts[-1] for parts in (line.split() for line in fh)
                if len(parts) >= 6 and "libcudart" in parts[-1].rsplit("/", 1)[-1]))
    except OSError:
        return None
    if not paths:
        return None
    import torch

    try:
        rt = ctypes.CDLL(prefer_torchs(paths, os.path.dirname(torch.__file__)))
    except OSError:
        return None
    vp, size = ctypes.c_void_p, ctypes.c_size_t
    try:
        rt.cudaMemcpyAsync.argtypes = [vp, vp, size, ctypes.c_int, vp]
        rt.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        rt.cudaEventRecord.argtypes = [vp, vp]
        rt.cudaEventSynchronize.argtypes = [vp]
        rt.cudaEventDestroy.argtypes = [vp]
        rt.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        rt.cudaStreamSynchronize.argtypes = [vp]
        rt.cudaStreamDestroy.argtypes = [vp]
        rt.cudaSetDevice.argtypes = [ctypes.c_int]
        rt.cudaGetErrorString.argtypes = [ctypes.c_int]
        rt.cudaGetErrorString.restype = ctypes.c_char_p
        rt.cudaGetLastError.argtypes = []
    except AttributeError:  # not the runtime library after all
        return None
    return rt


def prefer_torchs(paths: list[str], torch_dir: str) -> str:
    """Of the loaded ``libcudart`` files, torch's own (bundled, or from the nvidia-* wheel it
    depends on): another package may have loaded its runtime too."""
    return sorted(paths, key=lambda p: not (p.startswith(torch_dir) or "/nvidia/" in p))[0]


def check(rc: int, what: str) -> None:
    """Raise :class:`CudaError` naming ``what`` and the runtime's message when ``rc`` is not 0."""
    if rc:
        rt = lib()
        msg = rt.cudaGetErrorString(rc).decode() if rt is not None else "unknown error"
        raise CudaError(f"{what} failed: {msg} (cudaError {rc})")
