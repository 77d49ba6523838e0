"""Torch checkpoint sources: ``.pt``/``.pth``/``.bin``/``.ckpt`` state dicts.

Loaded by ``torch.load(weights_only=True, mmap=True)`` only -- nothing in an untrusted pickle is
ever executed -- so its pickle decides the tensors' layout. After each storage has been converted,
its pages are released with ``madvise(MADV_DONTNEED)`` -- only for storages found inside a private
mapping of the source file (``/proc/self/maps``, Linux), where that only drops clean copies of file
pages that the kernel reads again if touched. Elsewhere they stay mapped. Tied weights (two keys
sharing one storage) get the same ``tie`` key, so the writer encodes them once.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import GGUFError, _safe
from ..writer import SourceTensor, tensor_tie
from . import Source, _check_dtype


def _torch_load(path: str) -> tuple[Any, bool]:
    """``(object, memory-mapped)`` of a torch checkpoint, loaded with ``weights_only=True`` only.

    ``weights_only=True`` is explicit, so no environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_
    LOAD``) can turn it off: the unpickler builds tensors and plain containers and refuses any other
    global before anything is called. Every failure becomes a :class:`GGUFError` naming the file.
    """
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
        # Legacy (pre-zipfile) checkpoints cannot be memory-mapped: they load whole.
        return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        raise GGUFError("refusing to load: the checkpoint holds objects other than tensors and "
                        "plain containers" + (f" ({detail})" if detail else "")
                        + "; nothing in it was executed (torch.load runs with weights_only=True "
                        "only)", path=path) from None
    except (OSError, MemoryError):  # the machine's problem, not the file's
        raise
    except Exception as exc:  # zip/pickle structure errors of a corrupt or foreign file
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise GGUFError(f"not a readable torch checkpoint: torch.load failed with "
                        f"{type(exc).__name__}" + (f": {_safe(first, 300)}" if first else ""),
                        path=path) from None


def _unpickling_detail(message: str) -> str:
    """The one line of torch's weights-only refusal that says what was refused.

    The rest of torch's message suggests ``weights_only=False`` -- wrong advice for an untrusted
    file -- and may hold ANSI escapes; only the detail is kept, escaped.
    """
    for marker in ("WeightsUnpickler error:", "Trying to load"):
        i = message.rfind(marker)
        if i < 0:
            continue
        rest = message[i + len(marker):] if marker.endswith(":") else message[i:]
        line = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
        return _safe(line.split(" Please use")[0], 300)
    return ""


def _open_torch(path: str, src: Source) -> None:
    src.files.append(path)
    obj, mapped = _torch_load(path)
    if not mapped:
        src.notes.append("legacy .pt format: loaded whole into memory (no mmap)")
    if not isinstance(obj, Mapping):
        raise GGUFError(f"expected a state dict (a mapping of tensors), found {type(obj).__name__}",
                        path=path)
    for wrapper in ("state_dict", "model", "module", "model_state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()) \
                and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            src.notes.append(f"tensors taken from the checkpoint's {wrapper!r} entry")
            obj = inner
            break
    skipped = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        entries = "entry" if len(skipped) == 1 else "entries"
        more = " ..." if len(skipped) > 5 else ""
        src.notes.append(f"skipped {len(skipped)} non-tensor {entries}: "
                         f"{', '.join(_safe(k, 100) for k in skipped[:5])}{more}")
    # Pages of a checkpoint of the other byte order were byte-swapped in place by torch.load
    # (private copies): dropping them would bring back the unswapped file bytes. Never released.
    mapped_ranges = _mapped_ranges(path) if mapped and _byteorder(path) == sys.byteorder else []
    seen_ties: set[Any] = set()
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            continue
        if not isinstance(name, str):
            raise GGUFError(f"state dict key {_safe(repr(name))} is not a string", path=path)
        _check_dtype(name, t.dtype if t.dtype != torch.bool else None, str(t.dtype), path)
        tie = tensor_tie(t)
        nbytes = 0 if tie in seen_ties else t.numel() * t.element_size()
        if tie is not None:
            seen_ties.add(tie)
        src.tensors.append(SourceTensor(name, tuple(t.shape), t.dtype, (lambda t=t: t), None,  # type: ignore[misc]
                                        nbytes, tie, _page_releaser(t, mapped_ranges)))


# -- giving back the pages of a memory-mapped .pt ---------------------------------------------


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` of this process's private mappings of ``path``.

    Read from ``/proc/self/maps`` (Linux); elsewhere ``[]``, and nothing is ever released. A
    mapping is recognised by the file's device and inode, or by its path.
    """
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return []
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or len(parts[1]) < 4 or parts[1][3] != "p":
            continue
        try:
            start, end = (int(a, 16) for a in parts[0].split("-"))
            major, minor = (int(d, 16) for d in parts[3].split(":"))
            inode = int(parts[4])
        except ValueError:
            continue
        same_file = (inode == st.st_ino and os.makedev(major, minor) == st.st_dev) or \
            (len(parts) == 6 and parts[5].rstrip("\n") == real)
        if same_file:
            out.append((start, end))
    return out


def _byteorder(path: str) -> str | None:
    """The byte order a zip-format torch checkpoint records (``little`` when it records none, as
    torch assumes), or ``None`` when it cannot be told."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/byteorder") or n == "byteorder"]
            if not names:
                return "little"
            return z.read(names[0]).decode("ascii", "replace").strip()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


_madvise: Any = None


def _page_releaser(t: torch.Tensor, ranges: list[tuple[int, int]]) -> Callable[[], None] | None:
    """A function dropping the resident pages of ``t``'s storage, or ``None`` when the storage is
    not inside a private mapping of the source (then releasing could lose data)."""
    if not ranges or t.numel() == 0:
        return None
    try:
        storage = t.untyped_storage()
        begin, size = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None
    page = mmap.PAGESIZE
    for start, end in ranges:
        if start <= begin and begin + size <= end:
            # Whole pages covering the storage, within the mapping: neighbours' pages dropped
            # too are clean file pages, read again from the file if they are used later.
            lo = begin - (begin - start) % page
            hi = min(end, -(-(begin + size) // page) * page)
            return lambda lo=lo, n=hi - lo: _dontneed(lo, n)  # type: ignore[misc]
    return None


def _dontneed(address: int, length: int) -> None:
    global _madvise
    if _madvise is None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    # Advice only: a failure leaves the pages resident, which costs memory, not correctness.
    _madvise(address, length, mmap.MADV_DONTNEED)
