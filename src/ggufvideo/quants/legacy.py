"""The 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Dequantization follows ggml's ``dequantize_row_*`` operation for operation in float32, so the
result is bit-identical (torch on CPU/CUDA never contracts a separate mul and add into an FMA).
Quantization lives in :mod:`._quantize_legacy` (the search code is long; the layouts stay here).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from ._bits import DecodesInto, const, f16_scale, iq4_values, nibbles
from .base import F16, I8, U8, Layout, QuantType, delegated_quantizer

__all__ = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]


def _quantizer(name: str) -> classmethod:
    # The weighted Q4_0..Q5_1 encoders scale the importance by the row's mean square.
    return delegated_quantizer("_quantize_legacy", name, row_aware=True)


def _fifth_bits(qh: torch.Tensor, if_clear: int, if_set: int) -> torch.Tensor:
    """Q5_0/Q5_1's 32 fifth bits ``(n, 4)`` bytes -> ``(n, 32)`` uint8 of ``if_clear``/``if_set``.

    Bit ``j`` of the little-endian u32 is element ``j``'s. One 256-entry table lookup per *byte*
    (each entry is 8 output bytes packed in an int64) replaces a broadcast shift-and-mask over
    every element, which torch runs on its slow non-vectorized path.
    """

    def make() -> torch.Tensor:
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        bits = (byte >> torch.arange(8, dtype=torch.int64)) & 1
        vals = torch.where(bits == 1, if_set, if_clear).to(torch.uint8)  # (256, 8)
        return vals.contiguous().view(torch.int64).reshape(256)

    table = const(f"q5_bits_{if_clear}_{if_set}", qh.device, make)
    return table.index_select(0, qh.reshape(-1).long()).view(torch.uint8).view(qh.shape[0], 32)


class Q4_0(DecodesInto, QuantType, qtype=T.Q4_0, block_size=32,
           layout=Layout(("d", F16, 1), ("qs", U8, 16))):
    """``y = (q - 8) * d``; byte j holds element j (low nibble) and j+16 (high nibble)."""

    quantize_blocks = _quantizer("quantize_q4_0")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        q = nibbles(cls.layout.field(blocks, "qs")).view(torch.int8).sub_(8)  # (n, 2, 16)
        # ggml: float(q - 8) * d. The int8 -> float32 widening is exact, so one product remains.
        out.copy_(q.view(-1, 32)).mul_(d)


class Q4_1(DecodesInto, QuantType, qtype=T.Q4_1, block_size=32,
           layout=Layout(("d", F16, 1), ("m", F16, 1), ("qs", U8, 16))):
    """``y = q * d + m``."""

    quantize_blocks = _quantizer("quantize_q4_1")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        m = f16_scale(cls.layout, blocks, "m")
        q = nibbles(cls.layout.field(blocks, "qs")).view(-1, 32)
        # ggml: q*d + m, two roundings (a product, then a sum), never fused.
        out.copy_(q).mul_(d).add_(m)


class Q5_0(DecodesInto, QuantType, qtype=T.Q5_0, block_size=32,
           layout=Layout(("d", F16, 1), ("qh", U8, 4), ("qs", U8, 16))):
    """``y = (q - 16) * d``; ``qh`` is a little-endian u32 whose bit j is element j's 5th bit."""

    quantize_blocks = _quantizer("quantize_q5_0")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        lo = nibbles(cls.layout.field(blocks, "qs")).view(-1, 32)
        # q - 16 = low4 + (16*bit - 16): the table yields the bracket as int8 (0 or -16).
        hi = _fifth_bits(cls.layout.field(blocks, "qh"), 0xF0, 0)
        q = lo.view(torch.int8) + hi.view(torch.int8)
        out.copy_(q).mul_(d)


class Q5_1(DecodesInto, QuantType, qtype=T.Q5_1, block_size=32,
           layout=Layout(("d", F16, 1), ("m", F16, 1), ("qh", U8, 4), ("qs", U8, 16))):
    """``y = q * d + m`` with 5-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q5_1")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        m = f16_scale(cls.layout, blocks, "m")
        lo = nibbles(cls.layout.field(blocks, "qs")).view(-1, 32)
        q = lo.bitwise_or_(_fifth_bits(cls.layout.field(blocks, "qh"), 0, 16))
        out.copy_(q).mul_(d).add_(m)


class Q8_0(DecodesInto, QuantType, qtype=T.Q8_0, block_size=32,
           layout=Layout(("d", F16, 1), ("qs", I8, 32))):
    """``y = d * q`` with ``q`` a signed byte."""

    quantize_blocks = _quantizer("quantize_q8_0")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        f = cls.layout["qs"]
        # The int8 bytes are read in place (a strided view), not gathered into a copy first.
        out.copy_(blocks[:, f.offset:f.offset + f.nbytes].view(torch.int8)).mul_(d)


class IQ4_NL(DecodesInto, QuantType, qtype=T.IQ4_NL, block_size=32,
             layout=Layout(("d", F16, 1), ("qs", U8, 16))):
    """``y = d * KVALUES[q]``, a non-linear 4-bit codebook; nibble order as Q4_0."""

    quantize_blocks = _quantizer("quantize_iq4_nl")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        # ggml: d * kvalues[q]; float products commute, so table value times d is the same bits.
        iq4_values(nibbles(cls.layout.field(blocks, "qs")), out).view(-1, 32).mul_(d)
