"""The codebook ("i-quant") types: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S.

Their lattice grids are data, not code: they are taken at run time from gguf-py (a runtime
dependency), which carries ggml's tables, rather than duplicated here.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, U8, U16, Layout, QuantType

__all__ = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]


class IQ2_XXS(QuantType, qtype=T.IQ2_XXS, block_size=256,
              layout=Layout(("d", F16, 1), ("qs", U16, 32))):
    """2.06 bits/weight: 8-element grid points with sign patterns, 4-bit sub-block scales."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ2_XS(QuantType, qtype=T.IQ2_XS, block_size=256,
             layout=Layout(("d", F16, 1), ("qs", U16, 32), ("scales", U8, 8))):
    """2.31 bits/weight."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ2_S(QuantType, qtype=T.IQ2_S, block_size=256,
            layout=Layout(("d", F16, 1), ("qs", U8, 64), ("qh", U8, 8), ("scales", U8, 8))):
    """2.5 bits/weight (``qs`` holds 32 grid indices low bytes then 32 sign bytes)."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ3_XXS(QuantType, qtype=T.IQ3_XXS, block_size=256,
              layout=Layout(("d", F16, 1), ("qs", U8, 96))):
    """3.06 bits/weight: 4-element grid points; the last 32 bytes of ``qs`` hold scales and signs."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ3_S(QuantType, qtype=T.IQ3_S, block_size=256,
            layout=Layout(("d", F16, 1), ("qs", U8, 64), ("qh", U8, 8), ("signs", U8, 32),
                          ("scales", U8, 4))):
    """3.44 bits/weight."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ1_S(QuantType, qtype=T.IQ1_S, block_size=256,
            layout=Layout(("d", F16, 1), ("qs", U8, 32), ("qh", U16, 8))):
    """1.56 bits/weight."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ1_M(QuantType, qtype=T.IQ1_M, block_size=256,
            layout=Layout(("qs", U8, 32), ("qh", U8, 16), ("scales", U8, 8))):
    """1.75 bits/weight; the super-block scale is spread over the top nibbles of ``scales``."""

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
