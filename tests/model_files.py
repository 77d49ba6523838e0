"""Writing a model's weights to a GGUF file for the model-loading tests (gguf-py's writer).

Quantized bytes come from ggml itself (the oracle) when it is installed, else from our own
quantizer; a test needing a type neither can produce is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import gguf
import numpy as np
import oracle as _oracle
import pytest
import torch
from gguf import GGMLQuantizationType as T

PLAIN = {T.F32: np.float32, T.F16: np.float16}
COMFY_ORIG_SHAPE = "comfy.gguf.orig_shape."


def quantize_rows(x: np.ndarray, qtype: T) -> np.ndarray:
    """Rows of float32 ``(rows, n)`` -> ggml blocks ``(rows, row_bytes)`` uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lib = _oracle.load()
    if lib is not None:
        return _oracle.Oracle(lib).quantize(x, qtype)
    from ggufvideo.quants import get_quant_type

    qt = get_quant_type(qtype)
    try:
        blocks = qt.quantize_blocks(torch.from_numpy(x).reshape(-1, qt.block_size), None)
    except (ImportError, NotImplementedError):
        pytest.skip(f"no quantizer for {qtype.name}: neither the ggml oracle nor our own")
    return blocks.numpy().reshape(x.shape[0], -1)


def quantizable(shape: torch.Size, qtype: T) -> bool:
    """What a converter would quantize: weights of 2+ dims with whole blocks; 1-D stays F32."""
    bs = gguf.GGML_QUANT_SIZES[qtype][0]
    n = shape.numel()
    return len(shape) >= 2 and n >= 256 and n % bs == 0 and n > shape[0]


def write_gguf(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               qtype_of: Callable[[str, torch.Tensor], T], *, prefix: str = "") -> str:
    """Write ``tensors`` (float) under ``prefix + name`` with the type ``qtype_of`` picks.

    Quantized tensors whose last dim is not a whole number of blocks (3x3x3 conv kernels, Wan's
    1x2x2 patch embedding) are stored flattened with ComfyUI-GGUF's ``comfy.gguf.orig_shape``
    metadata, as its converter does.
    """
    w = gguf.GGUFWriter(os.fspath(path), "wan")
    for name, t in tensors.items():
        key = prefix + name
        arr = t.detach().to(torch.float32).cpu().numpy()
        qtype = qtype_of(name, t)
        if qtype in PLAIN:
            w.add_tensor(key, np.ascontiguousarray(arr.astype(PLAIN[qtype])))
            continue
        bs = gguf.GGML_QUANT_SIZES[qtype][0]
        if arr.ndim >= 2 and arr.shape[-1] % bs == 0:
            rows = arr.reshape(-1, arr.shape[-1])
            q = quantize_rows(rows, qtype).reshape(*arr.shape[:-1], -1)
        else:
            row = 256 if arr.size % 256 == 0 else bs
            q = quantize_rows(arr.reshape(-1, row), qtype)
            w.add_array(COMFY_ORIG_SHAPE + key, [int(d) for d in arr.shape])
        w.add_tensor(key, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)


def policy(qtype: T) -> Callable[[str, torch.Tensor], T]:
    """Quantize what :func:`quantizable` allows to ``qtype``, keep the rest F32."""
    def pick(name: str, t: torch.Tensor) -> T:
        if qtype in PLAIN:
            return qtype if t.dim() >= 2 else T.F32
        return qtype if quantizable(t.shape, qtype) else T.F32

    return pick


def tensor_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of tensor data in a GGUF file."""
    from ggufvideo import GGUFFile

    with GGUFFile(path) as f:
        return sum(info.nbytes for info in f.tensors.values())


def add_gguf_tensor(writer: gguf.GGUFWriter, key: str, arr: np.ndarray, qtype: T) -> None:
    """Add ``arr`` to a gguf-py writer as ``qtype``: F32/F16 as values, a quantized type as the
    blocks of its rows (the last dim)."""
    if qtype in PLAIN:
        writer.add_tensor(key, np.ascontiguousarray(arr.astype(PLAIN[qtype])))
        return
    raw = quantize_rows(arr.reshape(-1, arr.shape[-1]), qtype)
    writer.add_tensor(key, raw.reshape(arr.shape[0], -1), raw_dtype=qtype)


def close_gguf(writer: gguf.GGUFWriter, path: str | os.PathLike[str]) -> str:
    """Write the header, metadata and tensors of a gguf-py writer; returns the path."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)
