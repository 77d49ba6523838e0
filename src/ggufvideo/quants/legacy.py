"""The 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Dequantization follows ggml's ``dequantize_row_*`` operation for operation in float32, so the
result is bit-identical (torch on CPU/CUDA never contracts a separate mul and add into an FMA).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, I8, Layout, QuantType

__all__ = ["Q8_0"]


class Q8_0(QuantType, qtype=T.Q8_0, block_size=32, layout=Layout(("d", F16, 1), ("qs", I8, 32))):
    """``y = d * q`` with ``q`` a signed byte."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = cls.layout.field(blocks, "d").to(torch.float32)
        qs = cls.layout.field(blocks, "qs").view(torch.int8)
        return qs.to(torch.float32) * d
