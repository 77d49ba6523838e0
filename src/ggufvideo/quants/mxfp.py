"""Microscaling floating-point types: MXFP4 (OCP MX, E2M1 elements with an E8M0 shared scale)."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import U8, Layout, QuantType

__all__ = ["MXFP4"]


class MXFP4(QuantType, qtype=T.MXFP4, block_size=32, layout=Layout(("e", U8, 1), ("qs", U8, 16))):
    """``y = E2M1[q] * 2^(e-127)`` (ggml stores E2M1 values doubled, halving the scale)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
