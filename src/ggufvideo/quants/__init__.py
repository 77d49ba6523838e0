"""Quant types: the registry, and row-level :func:`dequantize` / :func:`quantize`.

Where a new quant type goes: a class in the family module (``plain``, ``legacy``, ``kquants``,
``iquants``, ``ternary``, ``mxfp``) subclassing :class:`QuantType` with its layout. Importing this
package registers every codec.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from ..errors import QuantizationError
from . import iquants, kquants, legacy, mxfp, plain, ternary  # noqa: F401  (registers codecs)
from .base import Field, Layout, QuantType, get_quant_type, registered_types, to_qtype

__all__ = [
    "Field",
    "Layout",
    "QuantType",
    "dequantize",
    "get_quant_type",
    "registered_types",
    "to_qtype",
]

# Elements decoded per chunk: bounds the float32/int temporaries of a codec to a few tens of MB
# whatever the tensor size, and keeps the working set near the CPU caches.
_CHUNK_ELEMENTS = 1 << 20


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
        raise QuantizationError(f"dequantize({qt.qtype.name}): expected uint8 data, got {data.dtype}")
    if data.dim() == 0:
        raise QuantizationError(f"dequantize({qt.qtype.name}): expected shape (..., row_bytes), "
                                "got a 0-d tensor")
    row_elems = qt.row_elements(data.shape[-1])
    out_shape = (*data.shape[:-1], row_elems)
    ts = qt.type_size()
    blocks = data.reshape(-1, ts)
    n_blocks = blocks.shape[0]
    out = torch.empty((n_blocks, qt.block_size), dtype=dtype, device=data.device)
    step = max(1, _CHUNK_ELEMENTS // qt.block_size)
    for start in range(0, n_blocks, step):
        chunk = qt.dequantize_blocks(blocks[start:start + step])
        out[start:start + step] = chunk  # float32 -> dtype: the one rounding
    return out.reshape(out_shape)
