"""Ternary types (weights in {-1, 0, 1} times a scale): TQ1_0, TQ2_0."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, U8, Layout, QuantType

__all__ = ["TQ1_0", "TQ2_0"]


class TQ1_0(QuantType, qtype=T.TQ1_0, block_size=256,
            layout=Layout(("qs", U8, 48), ("qh", U8, 4), ("d", F16, 1))):
    """1.69 bits/weight: five trits per byte (base-3, scaled into a byte), four in ``qh``."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TQ2_0(QuantType, qtype=T.TQ2_0, block_size=256, layout=Layout(("qs", U8, 64), ("d", F16, 1))):
    """2 bits per trit: ``y = (q - 1) * d``."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
