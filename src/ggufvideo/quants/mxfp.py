"""Microscaling floating-point types: MXFP4 (OCP MX, E2M1 elements with an E8M0 shared scale).

ggml stores each E2M1 code's value doubled (``kvalues_mxfp4``, small integers, taken from gguf-py)
and compensates with half the E8M0 scale, ``2**(e - 128)``. Every element is one float32
product ``kvalue * scale``: exact where it is representable, and it overflows to ±inf exactly as
ggml does for the largest exponents (e ≥ 253 with |kvalue| large enough).
"""

from __future__ import annotations

import functools

import gguf.quants
import torch
from gguf import GGMLQuantizationType as T

from .base import U8, Layout, QuantType
from .iquants import times_scale

__all__ = ["MXFP4", "e8m0_to_fp32_half"]


@functools.cache
def _byte_values(device: torch.device) -> torch.Tensor:
    """Both doubled E2M1 values of every ``qs`` byte, int16 ``(256,)``: byte 0 (int8) is
    ``kvalues[b & 15]``, byte 1 ``kvalues[b >> 4]`` (``kvalues_mxfp4`` from gguf-py)."""
    kvalues = torch.tensor(gguf.quants.MXFP4.kvalues, dtype=torch.int8)
    b = torch.arange(256)
    pairs = torch.stack((kvalues[b & 15], kvalues[b >> 4]), dim=-1).contiguous()
    return pairs.view(torch.int16).reshape(-1).to(device)


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """Half of an E8M0 scale, ``2**(e - 128)``, as float32, for uint8 ``e``; any device.

    Built from its bit pattern as ggml does: e = 0 and 1 give the subnormals 2**-128 and 2**-127,
    e ≥ 2 the normal with biased exponent e - 1. Every e, 255 included, is finite (ggml gives
    E8M0's NaN code no special meaning here).
    """
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


class MXFP4(QuantType, qtype=T.MXFP4, block_size=32, layout=Layout(("e", U8, 1), ("qs", U8, 16))):
    """``y = E2M1[q] * 2^(e-127)`` (ggml stores E2M1 values doubled, halving the scale).

    Byte j of ``qs`` holds element j (low nibble) and element j + 16 (high nibble).
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = e8m0_to_fp32_half(cls.layout.field(blocks, "e"))               # (n, 1)
        qs = cls.layout.field(blocks, "qs").to(torch.int32)
        pairs = _byte_values(blocks.device)[qs].unsqueeze(-1).view(torch.int8)  # (n, 16, 2)
        values = pairs.transpose(1, 2).reshape(n, 32)  # reordered while still int8
        return times_scale(values, d)  # float(kvalue) * d, as ggml
