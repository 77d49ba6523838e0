"""Ternary types (weights in {-1, 0, 1} times a scale): TQ1_0, TQ2_0.

Dequantization is ggml's: every element is ``float(t) * d`` with ``t`` in {-1, 0, 1} and ``d``
the f16 block scale widened to float32 — a single, exactly rounded product, so bit-identical.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, U8, Layout, QuantType

__all__ = ["TQ1_0", "TQ2_0"]


@functools.lru_cache(maxsize=None)
def _int_const(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int32 column ``(len(values), 1)`` on ``device``, made once rather than per call."""
    return torch.tensor(values, dtype=torch.int32, device=device).unsqueeze(-1)


def _scale(cls: type[QuantType], blocks: torch.Tensor) -> torch.Tensor:
    """The f16 block scale ``d`` as float32 ``(n_blocks, 1)``."""
    return cls.layout.field(blocks, "d").to(torch.float32)


class TQ1_0(QuantType, qtype=T.TQ1_0, block_size=256,
            layout=Layout(("qs", U8, 48), ("qh", U8, 4), ("d", F16, 1))):
    """1.69 bits/weight: five trits per byte (base-3, scaled into a byte), four in ``qh``.

    A byte ``b`` stores trits as a fixed-point base-3 fraction: multiplying it by ``3**n``
    (mod 256) brings trit n to the top, read back as ``(q * 3) >> 8``. Elements come out trit
    position-major: ``qs[0:32]`` gives 5 runs of 32, ``qs[32:48]`` 5 runs of 16, ``qh`` 4 runs
    of 4.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        qs = cls.layout.field(blocks, "qs").to(torch.int32)
        qh = cls.layout.field(blocks, "qh").to(torch.int32)
        pow5 = _int_const((1, 3, 9, 27, 81), dev)
        pow4 = _int_const((1, 3, 9, 27), dev)
        # (n, 1, m) * (k, 1) -> (n, k, m): run k holds trit k of each byte, bytes in order.
        parts = (qs[:, None, :32] * pow5, qs[:, None, 32:] * pow5, qh[:, None, :] * pow4)
        q = torch.cat([p.reshape(n, -1) for p in parts], dim=1) & 0xFF
        trits = ((q * 3) >> 8) - 1
        return trits.to(torch.float32) * _scale(cls, blocks)


class TQ2_0(QuantType, qtype=T.TQ2_0, block_size=256, layout=Layout(("qs", U8, 64), ("d", F16, 1))):
    """2 bits per trit: ``y = (q - 1) * d``.

    Each 32-byte half of ``qs`` gives 128 elements: bits 2l..2l+1 of its 32 bytes are the l-th
    run of 32.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        qs = cls.layout.field(blocks, "qs").to(torch.int32).reshape(n, 2, 1, 32)
        q = (qs >> (2 * _int_const((0, 1, 2, 3), dev))) & 3                # (n, 2, 4, 32)
        return (q - 1).reshape(n, 256).to(torch.float32) * _scale(cls, blocks)
