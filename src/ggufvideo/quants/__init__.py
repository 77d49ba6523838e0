"""Quant types: the registry, and row-level :func:`dequantize` / :func:`quantize`.

Where a new quant type goes: a class in the family module (``plain``, ``legacy``, ``kquants``,
``iquants``, ``ternary``, ``mxfp``) subclassing :class:`QuantType` with its layout. Importing this
package registers every codec.
"""

from __future__ import annotations

import math

import torch
from gguf import GGMLQuantizationType

from ..errors import QuantizationError, UnsupportedTypeError
from . import iquants, kquants, legacy, mxfp, plain, ternary  # noqa: F401  (registers codecs)
from .base import Field, Layout, QuantType, get_quant_type, registered_types, to_qtype

__all__ = [
    "Field",
    "Layout",
    "QuantType",
    "dequantize",
    "get_quant_type",
    "quantize",
    "registered_types",
    "to_qtype",
]

# Elements decoded per chunk: bounds the float32/int temporaries of a codec to a few tens of MB
# whatever the tensor size, and keeps the working set near the CPU caches. Smaller chunks pay
# torch's per-op overhead (~5-10 us x ~10 ops) too often; larger ones spill out of the L3 cache.
_CHUNK_ELEMENTS = 1 << 20
# On an accelerator the per-op launch cost dominates small chunks and there is no cache to fit:
# 16M elements keeps temporaries at a few hundred MB while a 14B layer takes ~5 steps.
_DEVICE_CHUNK_ELEMENTS = 1 << 24

# Outputs at least this large are allocated through numpy on CPU (see _empty).
_NUMPY_ALLOC_BYTES = 1 << 22


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output tensor, cheap to fill even when it is hundreds of MB.

    torch's CPU allocator hands large blocks straight from ``mmap`` without huge pages (unless
    the process started with ``THP_MEM_ALLOC_ENABLE=1``), so writing a fresh 100 MB output takes
    ~25k page faults, about three times as long as decoding into it. numpy's allocator advises
    the kernel to back large arrays with transparent huge pages, so on CPU we borrow it: the
    returned tensor shares the numpy array's memory (and keeps it alive); it is an ordinary
    tensor except that its storage cannot be resized.
    """
    n = 1
    for s in shape:
        n *= s
    nbytes = n * dtype.itemsize
    if device.type != "cpu" or nbytes < _NUMPY_ALLOC_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    import numpy as np

    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType | str | int, *,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode rows of ggml blocks.

    Args:
        data: uint8 tensor of shape ``(..., row_bytes)``; any device.
        qtype: the ggml type, as ``GGMLQuantizationType`` or its name (``"Q4_K"``).
        dtype: output dtype. float32 is bit-identical to ggml's ``dequantize_row_*``; float16 and
            bfloat16 are that exact float32 value rounded once.

    Returns:
        Tensor of shape ``(..., row_elements)`` and ``dtype`` on ``data``'s device.
    """
    qt = get_quant_type(qtype)
    if data.dtype != torch.uint8:
        raise QuantizationError(
            f"dequantize({qt.qtype.name}): expected uint8 data, got {data.dtype}")
    if data.dim() == 0:
        raise QuantizationError(f"dequantize({qt.qtype.name}): expected shape (..., row_bytes), "
                                "got a 0-d tensor")
    row_elems = qt.row_elements(data.shape[-1])
    out_shape = (*data.shape[:-1], row_elems)
    ts = qt.type_size()
    blocks = data.reshape(-1, ts)
    n_blocks = blocks.shape[0]
    out = _empty((n_blocks, qt.block_size), dtype, data.device)
    if torch.compiler.is_compiling():
        # Traced: one step, so inductor fuses the whole decode instead of unrolling a loop.
        chunk = n_blocks * qt.block_size
    else:
        chunk = _CHUNK_ELEMENTS if data.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    step = max(1, chunk // qt.block_size)
    # Codecs that can decode into a given float32 buffer write float32 output in place, and
    # other dtypes through one reused scratch chunk, instead of a fresh tensor per chunk.
    into = getattr(qt, "dequantize_into", None)
    scratch = None
    if into is not None and dtype != torch.float32:
        scratch = torch.empty((min(step, n_blocks), qt.block_size), dtype=torch.float32,
                              device=data.device)
    for start in range(0, n_blocks, step):
        part = blocks[start:start + step]
        if into is None:
            out[start:start + step] = qt.dequantize_blocks(part)  # float32 -> dtype: one rounding
        elif scratch is None:
            into(part, out[start:start + step])
        else:
            buf = scratch[:part.shape[0]]
            into(part, buf)
            out[start:start + step] = buf  # float32 -> dtype: the one rounding
    return out.reshape(out_shape)


# Elements encoded per step of quantize(): the candidate searches expand each element ~40-fold
# internally (in bounded slices), so this mainly bounds the float32 copy of a low-precision input.
_QUANTIZE_CHUNK_ELEMENTS = 1 << 20
# On an accelerator the per-op launch cost dominates small chunks and there is no cache to fit:
# 16M elements keeps temporaries at a few hundred MB while a 14B layer takes ~5 steps.
_DEVICE_CHUNK_ELEMENTS = 1 << 24


def quantize(x: torch.Tensor, qtype: GGMLQuantizationType | str | int, *,
             imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Encode rows of values as ggml blocks: the bytes a GGUF file stores for them.

    The result is byte-identical to ggml's ``ggml_quantize_chunk`` (what llama.cpp's quantizer
    calls) on the same float32 rows, with or without an importance matrix.

    Args:
        x: floating-point tensor ``(..., n)``, any dtype (converted to float32 exactly) and
            device; every value must be finite. ``n`` must be a multiple of the type's block size.
        qtype: the target type, as ``GGMLQuantizationType`` or its name: F32, F16, BF16, Q4_0,
            Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS.
        imatrix: optional importance of each of the ``n`` positions of a row (non-negative,
            finite), e.g. from llama.cpp's ``imatrix`` tool; the same weights apply to every row.
            Q8_0 and the float types ignore it, as ggml does.

    Returns:
        uint8 tensor ``(..., row_bytes)`` on ``x``'s device.

    Raises:
        UnsupportedTypeError: ``qtype`` is unknown or cannot be quantized to.
        QuantizationError: bad input (non-float, non-finite, wrong row length, bad ``imatrix``).
    """
    qt = get_quant_type(qtype)
    name = qt.qtype.name
    if not qt.can_quantize:
        raise UnsupportedTypeError(f"quantizing to {name} is not supported")
    if not isinstance(x, torch.Tensor):
        raise QuantizationError(f"quantize({name}): expected a torch.Tensor, "
                                f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise QuantizationError(f"quantize({name}): expected a floating-point tensor, "
                                f"got {x.dtype}")
    if x.dim() == 0:
        raise QuantizationError(f"quantize({name}): expected shape (..., n), got a 0-d tensor")
    n = x.shape[-1]
    row_bytes = qt.row_bytes(n)  # raises for a row length that is not whole blocks
    weights = _checked_imatrix(imatrix, n, name, x.device)

    rows = x.detach().reshape(math.prod(x.shape[:-1]), n)  # weights are often nn.Parameters
    out = torch.empty((rows.shape[0], row_bytes), dtype=torch.uint8, device=x.device)
    bs = qt.block_size
    nb = n // bs
    # A GPU step costs mostly kernel launches, so it takes bigger chunks than a CPU.
    chunk_elements = _QUANTIZE_CHUNK_ELEMENTS * (8 if x.device.type == "cuda" else 1)
    step = max(1, chunk_elements // max(n, 1))
    for start in range(0, rows.shape[0] if n else 0, step):
        chunk = rows[start:start + step].to(torch.float32)
        _check_finite(chunk, name, start)
        blocks = chunk.reshape(-1, bs)
        w = None
        if weights is not None:
            w = weights.reshape(1, nb, bs).expand(chunk.shape[0], nb, bs).reshape(-1, bs)
        # Every type goes through the registry; the row geometry matters to the encoders whose
        # weighting uses whole-row statistics (ggml's weighted Q4_0..Q5_1).
        enc = qt.quantize_blocks(blocks, w, blocks_per_row=nb)
        out[start:start + step] = enc.reshape(chunk.shape[0], row_bytes)
    return out.reshape(*x.shape[:-1], row_bytes)


def _checked_imatrix(imatrix: torch.Tensor | None, n: int, name: str,
                     device: torch.device) -> torch.Tensor | None:
    """The importance matrix as float32 on ``device``; QuantizationError saying what is wrong."""
    if imatrix is None:
        return None
    if not isinstance(imatrix, torch.Tensor):
        imatrix = torch.as_tensor(imatrix)
    if imatrix.dim() != 1 or imatrix.shape[0] != n:
        raise QuantizationError(f"quantize({name}): imatrix must be a 1-D tensor of {n} weights "
                                f"(one per position of a row), got shape {tuple(imatrix.shape)}")
    if not (imatrix.is_floating_point() or imatrix.dtype in (torch.int32, torch.int64)):
        raise QuantizationError(f"quantize({name}): imatrix must hold real numbers, "
                                f"got {imatrix.dtype}")
    w = imatrix.detach().to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise QuantizationError(f"quantize({name}): imatrix must be finite in float32, "
                                f"found {imatrix[i].item()} at position {i}")
    neg = w < 0
    if bool(neg.any()):
        i = int(neg.nonzero()[0, 0])
        raise QuantizationError(f"quantize({name}): imatrix weights must be >= 0, "
                                f"found {w[i].item()} at position {i}")
    return w


def _check_finite(chunk: torch.Tensor, name: str, row0: int) -> None:
    """ggml's searches assume finite input (NaN/inf make it assert or emit garbage)."""
    if chunk.numel() == 0:
        return
    # One min/max reduction (NaN propagates through it) is much cheaper than isfinite().all().
    if bool(torch.isfinite(torch.stack(torch.aminmax(chunk))).all()):
        return
    bad = ~torch.isfinite(chunk)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise QuantizationError(f"quantize({name}): input must be finite in float32, found "
                                f"{chunk[r, c].item()} at row {row0 + r}, column {c}")
