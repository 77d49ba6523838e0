"""ggml's own reference codecs (``libggml-base``, shipped in the pywhispercpp wheel), via ctypes.

Tests that compare against ggml use the ``oracle`` fixture, which skips when the library is absent.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_LIB: ctypes.CDLL | None = None
_TRIED = False


def _find_library() -> str | None:
    spec = importlib.util.find_spec("pywhispercpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    for pattern in ("libggml-base.so*", "pywhispercpp.libs/libggml-base*.so*", "libggml-base*.dylib"):
        hits = sorted(glob.glob(os.path.join(site, pattern)))
        if hits:
            return hits[0]
    return None


def load() -> ctypes.CDLL | None:
    """The oracle library, or None when it is not installed."""
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        path = _find_library()
        if path is not None:
            lib = ctypes.CDLL(path)
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                ctypes.c_void_p]
            if hasattr(lib, "ggml_quantize_init"):
                lib.ggml_quantize_init.argtypes = [ctypes.c_int]
            _LIB = lib
    return _LIB


class Oracle:
    """Thin numpy wrappers over ggml's reference routines."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def dequantize(self, blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        """``dequantize_row_<t>`` over ``(..., row_bytes)`` uint8 -> float32 ``(..., row_elems)``."""
        bs, ts = GGML_QUANT_SIZES[qtype]
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        n = blocks.size // ts * bs
        out = np.empty(n, dtype=np.float32)
        fn = getattr(self.lib, f"dequantize_row_{qtype.name.lower().replace('_k', '_K')}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        fn(blocks.ctypes.data, out.ctypes.data, n)
        return out.reshape(*blocks.shape[:-1], blocks.shape[-1] // ts * bs)

    def quantize(self, x: np.ndarray, qtype: GGMLQuantizationType,
                 imatrix: np.ndarray | None = None) -> np.ndarray:
        """``ggml_quantize_chunk`` over rows of ``x`` (float32, 2-D) -> uint8 ``(rows, row_bytes)``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n_per_row = x.shape
        bs, ts = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows, n_per_row // bs * ts), dtype=np.uint8)
        if hasattr(self.lib, "ggml_quantize_init"):
            self.lib.ggml_quantize_init(int(qtype))
        im = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            im = imatrix.ctypes.data
        self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n_per_row, im)
        return out
