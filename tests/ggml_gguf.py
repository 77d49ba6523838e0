"""ggml's own GGUF loader (``gguf_init_from_file`` in libggml-base, from the pywhispercpp wheel).

The C loader is stricter than gguf-py: at most 4 dims, names under 64 bytes, tensors laid out in
order and aligned. Tests use it to show that files we write are ones ggml accepts.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import oracle


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def ggml_read(path: str | os.PathLike[str]) -> list[tuple[str, int, int]] | None:
    """``[(name, ggml type id, data offset)]`` as ggml's C loader reads ``path``; ``None`` when it
    rejects the file (or crashes on it: the loader runs in a child process, since ggml aborts or
    faults on some inputs). Raises ``RuntimeError`` when the library is not installed."""
    if oracle.load() is None:
        raise RuntimeError("libggml-base not installed")
    code = ("import sys, json; sys.path.insert(0, sys.argv[2]); import ggml_gguf; "
            "print(json.dumps(ggml_gguf._read_here(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, os.fspath(path),
                           os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return None if out is None else [tuple(t) for t in out]


def _read_here(path: str) -> list[tuple[str, int, int]] | None:
    lib = oracle.load()
    if lib is None:
        raise RuntimeError("libggml-base not installed")
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_offset.restype = ctypes.c_size_t
    lib.gguf_get_tensor_offset.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(os.fsencode(path), _InitParams(True, None))
    if not ctx:
        return None
    try:
        return [(lib.gguf_get_tensor_name(ctx, i).decode(), lib.gguf_get_tensor_type(ctx, i),
                 lib.gguf_get_tensor_offset(ctx, i))
                for i in range(lib.gguf_get_n_tensors(ctx))]
    finally:
        lib.gguf_free(ctx)
