"""The 256-element super-block types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS.

Dequantization follows ggml's ``dequantize_row_*`` in float32 operation for operation (the scale
products ``d * sc`` are formed first, exactly as ggml does, then applied), so the float32 result is
bit-identical. Quantization lives in :mod:`._quantize_kquants`.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, I8, U8, U16, Layout, QuantType

__all__ = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


def _quantizer(name: str):
    """A ``quantize_blocks`` classmethod delegating to ``_quantize_kquants.<name>``."""

    def quantize_blocks(cls, x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
        from . import _quantize_kquants

        return getattr(_quantize_kquants, name)(x, imatrix)

    quantize_blocks.__doc__ = QuantType.quantize_blocks.__doc__
    return classmethod(quantize_blocks)


class Q2_K(QuantType, qtype=T.Q2_K, block_size=256,
           layout=Layout(("scales", U8, 16), ("qs", U8, 64), ("d", F16, 1), ("dmin", F16, 1))):
    """16 sub-blocks of 16: ``y = d*sc*q - dmin*m`` with 4-bit ``sc``/``m`` and 2-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q2_k")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q3_K(QuantType, qtype=T.Q3_K, block_size=256,
           layout=Layout(("hmask", U8, 32), ("qs", U8, 64), ("scales", U8, 12), ("d", F16, 1))):
    """16 sub-blocks of 16: ``y = d*(sc-32)*(q - 4*(1-hbit))`` with 6-bit ``sc``, 3-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q3_k")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q4_K(QuantType, qtype=T.Q4_K, block_size=256,
           layout=Layout(("d", F16, 1), ("dmin", F16, 1), ("scales", U8, 12), ("qs", U8, 128))):
    """8 sub-blocks of 32: ``y = d*sc*q - dmin*m``, 6-bit ``sc``/``m`` packed in 12 bytes."""

    quantize_blocks = _quantizer("quantize_q4_k")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q5_K(QuantType, qtype=T.Q5_K, block_size=256,
           layout=Layout(("d", F16, 1), ("dmin", F16, 1), ("scales", U8, 12), ("qh", U8, 32),
                         ("qs", U8, 128))):
    """As Q4_K with a 5th bit per element in ``qh``."""

    quantize_blocks = _quantizer("quantize_q5_k")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Q6_K(QuantType, qtype=T.Q6_K, block_size=256,
           layout=Layout(("ql", U8, 128), ("qh", U8, 64), ("scales", I8, 16), ("d", F16, 1))):
    """16 sub-blocks of 16: ``y = d*sc*(q-32)`` with signed 8-bit ``sc`` and 6-bit ``q``."""

    quantize_blocks = _quantizer("quantize_q6_k")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class IQ4_XS(QuantType, qtype=T.IQ4_XS, block_size=256,
             layout=Layout(("d", F16, 1), ("scales_h", U16, 1), ("scales_l", U8, 4),
                           ("qs", U8, 128))):
    """8 sub-blocks of 32: ``y = d*(ls-32)*KVALUES[q]`` with 6-bit ``ls``."""

    @classmethod
    def quantize_blocks(cls, x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
        """Encode with ggml's IQ4_XS scale search (see :mod:`._quantize_iq4`)."""
        from ._quantize_iq4 import quantize_iq4_xs

        return quantize_iq4_xs(x, imatrix)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
