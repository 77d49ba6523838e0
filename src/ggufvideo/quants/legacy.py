"""The 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Dequantization follows ggml's ``dequantize_row_*`` operation for operation in float32, so the
result is bit-identical (torch on CPU/CUDA never contracts a separate mul and add into an FMA).
Quantization lives in :mod:`._quantize_legacy` (the search code is long; the layouts stay here).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, I8, U8, Layout, QuantType

__all__ = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]


def _quantizer(name: str):
    """A ``quantize_blocks`` classmethod delegating to ``_quantize_legacy.<name>``."""

    def quantize_blocks(cls, x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
        from . import _quantize_legacy

        return getattr(_quantize_legacy, name)(x, imatrix)

    quantize_blocks.__doc__ = QuantType.quantize_blocks.__doc__
    return classmethod(quantize_blocks)


class Q4_0(QuantType, qtype=T.Q4_0, block_size=32, layout=Layout(("d", F16, 1), ("qs", U8, 16))):
    """``y = (q - 8) * d``; byte j holds element j (low nibble) and j+16 (high nibble)."""

    quantize_blocks = _quantizer("quantize_q4_0")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q4_1(QuantType, qtype=T.Q4_1, block_size=32,
           layout=Layout(("d", F16, 1), ("m", F16, 1), ("qs", U8, 16))):
    """``y = q * d + m``."""

    quantize_blocks = _quantizer("quantize_q4_1")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q5_0(QuantType, qtype=T.Q5_0, block_size=32,
           layout=Layout(("d", F16, 1), ("qh", U8, 4), ("qs", U8, 16))):
    """``y = (q - 16) * d``; ``qh`` is a little-endian u32 whose bit j is element j's 5th bit."""

    quantize_blocks = _quantizer("quantize_q5_0")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q5_1(QuantType, qtype=T.Q5_1, block_size=32,
           layout=Layout(("d", F16, 1), ("m", F16, 1), ("qh", U8, 4), ("qs", U8, 16))):
    """``y = q * d + m`` with 5-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q5_1")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q8_0(QuantType, qtype=T.Q8_0, block_size=32, layout=Layout(("d", F16, 1), ("qs", I8, 32))):
    """``y = d * q`` with ``q`` a signed byte."""

    quantize_blocks = _quantizer("quantize_q8_0")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = cls.layout.field(blocks, "d").to(torch.float32)
        qs = cls.layout.field(blocks, "qs")
        return qs.to(torch.float32) * d


class IQ4_NL(QuantType, qtype=T.IQ4_NL, block_size=32,
             layout=Layout(("d", F16, 1), ("qs", U8, 16))):
    """``y = d * KVALUES[q]``, a non-linear 4-bit codebook; nibble order as Q4_0."""

    quantize_blocks = _quantizer("quantize_iq4_nl")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
