"""The 256-element super-block types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS.

Dequantization follows ggml's ``dequantize_row_*`` in float32 operation for operation (the scale
products ``d * sc`` are formed first, exactly as ggml does, then applied), so the float32 result is
bit-identical. Quantization lives in :mod:`._quantize_kquants`.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from ._bits import DecodesInto, f16_scale, iq4_values, nibbles, scale_min_k4
from .base import F16, I8, U8, U16, Layout, QuantType, delegated_quantizer

__all__ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


def _quantizer(name: str) -> classmethod:
    return delegated_quantizer("_quantize_kquants", name)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """2-bit fields of bytes ``(n, h, 32)`` -> ``(n, h, 4, 32)`` uint8, bits 0-1 first.

    Q2_K and Q3_K store 128 elements per 32 bytes: element ``32*j + l`` is bits ``2j..2j+1`` of
    byte ``l``.
    """
    qs = qs.contiguous()
    return torch.stack((qs & 3, (qs >> 2) & 3, (qs >> 4) & 3, qs >> 6), dim=-2)


def _bit_planes(bits: torch.Tensor, at: int) -> torch.Tensor:
    """Bit ``g`` of every byte of ``(n, 32)``, moved to bit position ``at``, as ``(n, 8, 32)``.

    Q3_K's ``hmask`` and Q5_K's ``qh`` give element ``32*g + l`` bit ``g`` of byte ``l``. Eight
    whole-tensor shifts and one mask beat a broadcast tensor-by-tensor shift, which torch runs
    on its slow non-vectorized path.
    """
    bits = bits.contiguous()
    planes = [bits << (at - g) if g < at else bits >> (g - at) if g > at else bits
              for g in range(8)]
    return torch.stack(planes, dim=1).bitwise_and_(1 << at)


class Q2_K(DecodesInto, QuantType, qtype=T.Q2_K, block_size=256,
           layout=Layout(("scales", U8, 16), ("qs", U8, 64), ("d", F16, 1), ("dmin", F16, 1))):
    """16 sub-blocks of 16: ``y = d*sc*q - dmin*m`` with 4-bit ``sc``/``m`` and 2-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q2_k")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        dmin = f16_scale(cls.layout, blocks, "dmin")
        sc = cls.layout.field(blocks, "scales")
        # ggml forms dl = d*scale and ml = dmin*min per 16 elements, then y = dl*q - ml.
        dl = (sc & 15).to(torch.float32).mul_(d)
        ml = (sc >> 4).to(torch.float32).mul_(dmin)
        q = _crumbs(cls.layout.field(blocks, "qs").view(-1, 2, 32)).view(-1, 16, 16)
        out.view(q.shape).copy_(q).mul_(dl.unsqueeze(2)).sub_(ml.unsqueeze(2))


class Q3_K(DecodesInto, QuantType, qtype=T.Q3_K, block_size=256,
           layout=Layout(("hmask", U8, 32), ("qs", U8, 64), ("scales", U8, 12), ("d", F16, 1))):
    """16 sub-blocks of 16: ``y = d*(sc-32)*(q - 4*(1-hbit))`` with 6-bit ``sc``, 3-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q3_k")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        s = cls.layout.field(blocks, "scales")
        # 16 six-bit scales: low 4 bits are the nibbles of bytes 0-7 (low nibbles first), the
        # top 2 bits of scale 4a+b are bits 2a..2a+1 of byte 8+b.
        low = torch.cat((s[:, 0:8] & 15, s[:, 0:8] >> 4), dim=1)
        top = _crumbs(s[:, 8:12].unsqueeze(1)).view(-1, 16)
        sc = (low | (top << 4)).view(torch.int8) - 32
        dl = sc.to(torch.float32).mul_(d)  # ggml: d_all * (scale - 32)
        # q - (hbit ? 0 : 4) = (q | hbit << 2) - 4, built on bytes.
        q = _crumbs(cls.layout.field(blocks, "qs").view(-1, 2, 32)).view(-1, 8, 32)
        hbit = _bit_planes(cls.layout.field(blocks, "hmask"), 2)
        q = q.bitwise_or_(hbit).view(torch.int8).sub_(4)
        out.view(-1, 16, 16).copy_(q.view(-1, 16, 16)).mul_(dl.unsqueeze(2))


class _ScaleMinK(DecodesInto, QuantType):
    """Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes."""

    @classmethod
    def _low_nibbles(cls, blocks: torch.Tensor) -> torch.Tensor:
        """The 4-bit part of every element, ``(n, 8, 32)`` uint8 in element order."""
        return nibbles(cls.layout.field(blocks, "qs").view(-1, 4, 32)).view(-1, 8, 32)

    @classmethod
    def _scale_min_into(cls, blocks: torch.Tensor, out: torch.Tensor, q: torch.Tensor) -> None:
        """``out = d1*q - m1`` per 32-element sub-block (Q4_K and Q5_K share the packing)."""
        d = f16_scale(cls.layout, blocks, "d")
        dmin = f16_scale(cls.layout, blocks, "dmin")
        sc, mn = scale_min_k4(cls.layout.field(blocks, "scales"))
        dl = sc.to(torch.float32).mul_(d)  # ggml: d1 = d * sc, m1 = min * m; y = d1*q - m1
        ml = mn.to(torch.float32).mul_(dmin)
        out.view(q.shape).copy_(q).mul_(dl.unsqueeze(2)).sub_(ml.unsqueeze(2))


class Q4_K(_ScaleMinK, qtype=T.Q4_K, block_size=256,
           layout=Layout(("d", F16, 1), ("dmin", F16, 1), ("scales", U8, 12), ("qs", U8, 128))):
    """8 sub-blocks of 32: ``y = d*sc*q - dmin*m``, 6-bit ``sc``/``m`` packed in 12 bytes."""

    quantize_blocks = _quantizer("quantize_q4_k")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        cls._scale_min_into(blocks, out, cls._low_nibbles(blocks))


class Q5_K(_ScaleMinK, qtype=T.Q5_K, block_size=256,
           layout=Layout(("d", F16, 1), ("dmin", F16, 1), ("scales", U8, 12), ("qh", U8, 32),
                         ("qs", U8, 128))):
    """As Q4_K with a 5th bit per element in ``qh``."""

    quantize_blocks = _quantizer("quantize_q5_k")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = cls._low_nibbles(blocks).bitwise_or_(_bit_planes(cls.layout.field(blocks, "qh"), 4))
        cls._scale_min_into(blocks, out, q)


class Q6_K(DecodesInto, QuantType, qtype=T.Q6_K, block_size=256,
           layout=Layout(("ql", U8, 128), ("qh", U8, 64), ("scales", I8, 16), ("d", F16, 1))):
    """16 sub-blocks of 16: ``y = d*sc*(q-32)`` with signed 8-bit ``sc`` and 6-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q6_k")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        sc = cls.layout.field(blocks, "scales")
        # Per 128-element half: quarter k takes the low (k < 2) or high nibble of ql bytes
        # 32*(k%2) + l, and bits 2k..2k+1 of qh byte l as its top two bits.
        low = nibbles(cls.layout.field(blocks, "ql").view(-1, 2, 64))  # (n, half, nib, row*32)
        top = _crumbs(cls.layout.field(blocks, "qh").view(-1, 2, 32))  # (n, half, k, 32)
        q = low.view(-1, 2, 4, 32).bitwise_or_(top << 4).view(torch.int8).sub_(32)
        dl = sc.to(torch.float32).mul_(d)  # ggml: (d * sc) * q
        out.view(-1, 16, 16).copy_(q.view(-1, 16, 16)).mul_(dl.unsqueeze(2))


class IQ4_XS(DecodesInto, QuantType, qtype=T.IQ4_XS, block_size=256,
             layout=Layout(("d", F16, 1), ("scales_h", U16, 1), ("scales_l", U8, 4),
                           ("qs", U8, 128))):
    """8 sub-blocks of 32: ``y = d*(ls-32)*KVALUES[q]`` with 6-bit ``ls``."""

    quantize_blocks = delegated_quantizer("_quantize_iq4", "quantize_iq4_xs")

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d = f16_scale(cls.layout, blocks, "d")
        sl = cls.layout.field(blocks, "scales_l")
        sh = cls.layout.field(blocks, "scales_h").view(torch.int16).to(torch.int32)
        # 6-bit scale of sub-block ib: low 4 bits from nibble ib%2 of scales_l[ib/2], top 2 from
        # bits 2ib..2ib+1 of the u16 scales_h.
        low = torch.stack((sl & 15, sl >> 4), dim=2).view(-1, 8).to(torch.int32)
        shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=blocks.device)
        ls = low | (((sh >> shifts) & 3) << 4)
        dl = (ls - 32).to(torch.float32).mul_(d)  # ggml: d * (ls - 32)
        v = iq4_values(nibbles(cls.layout.field(blocks, "qs").view(-1, 8, 16)), out)
        v.view(-1, 8, 32).mul_(dl.unsqueeze(2))
