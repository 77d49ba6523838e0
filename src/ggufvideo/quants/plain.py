"""Unquantized ggml types: the bytes are the values, one element per "block"."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import Layout, QuantType

__all__ = ["PlainType"]


class PlainType(QuantType):
    """A type whose bytes are little-endian values of :attr:`torch_dtype`."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        assert cls.torch_dtype is not None
        return blocks.contiguous().view(cls.torch_dtype).to(torch.float32)

    @classmethod
    def quantize_blocks(cls, x: torch.Tensor, imatrix: torch.Tensor | None, *,
                        blocks_per_row: int = 1) -> torch.Tensor:
        # One rounding from float32, round-to-nearest-even: what ggml's fp32->fp16/bf16 do
        # for finite values.
        assert cls.torch_dtype is not None
        return x.to(cls.torch_dtype).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _plain(name: str, qtype: T, dtype: torch.dtype) -> type[PlainType]:
    return type(name, (PlainType,), {"__doc__": f"ggml {qtype.name}: raw {dtype} values."},
                qtype=qtype, layout=Layout(("v", dtype, 1)), torch_dtype=dtype)


F32 = _plain("F32", T.F32, torch.float32)
F16 = _plain("F16", T.F16, torch.float16)
BF16 = _plain("BF16", T.BF16, torch.bfloat16)
F64 = _plain("F64", T.F64, torch.float64)
I8 = _plain("I8", T.I8, torch.int8)
I16 = _plain("I16", T.I16, torch.int16)
I32 = _plain("I32", T.I32, torch.int32)
I64 = _plain("I64", T.I64, torch.int64)

for _int_type in (I8, I16, I32, I64):
    # Integer tensors (token ids, positions) are stored as they are, never quantized to.
    _int_type.can_quantize = False
