"""Ternary types (weights in {-1, 0, 1} times a scale): TQ1_0, TQ2_0.

Dequantization is ggml's: every element is ``float(t) * d`` with ``t`` in {-1, 0, 1} and ``d``
the f16 block scale widened to float32 — a single, exactly rounded product, so bit-identical.
The trits of every possible byte are tabulated once per device (int8, packed into words), so a
block decodes with one gather and one multiply.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGMLQuantizationType as T

from .base import F16, U8, Layout, QuantType
from .iquants import times_scale

__all__ = ["TQ1_0", "TQ2_0"]


@functools.cache
def _tq1_trits(device: torch.device) -> torch.Tensor:
    """Every byte's five trits, int64 ``(256,)`` whose bytes 0-4 are trits 0-4 as int8 in {-1,0,1}.

    ggml reads trit n of byte ``b`` as ``((b * 3**n mod 256) * 3) >> 8``, minus 1; the table holds
    exactly that for all 256 bytes (bytes > 242 included), so decoding is one word gather.
    """
    b = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
    q = (b * torch.tensor([1, 3, 9, 27, 81, 0, 0, 0], dtype=torch.int32)) & 0xFF
    trits = (((q * 3) >> 8) - 1).to(torch.int8)
    trits[:, 5:] = 0  # padding to a whole int64
    return trits.contiguous().view(torch.int64).reshape(-1).to(device)


@functools.cache
def _tq2_codes(device: torch.device) -> torch.Tensor:
    """Every byte's four 2-bit codes minus 1: int32 ``(256,)`` whose byte l (int8) is
    ``((b >> 2l) & 3) - 1``."""
    b = torch.arange(256, dtype=torch.int32).unsqueeze(-1)
    codes = (((b >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)) & 3) - 1).to(torch.int8)
    return codes.contiguous().view(torch.int32).reshape(-1).to(device)


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
        table = _tq1_trits(blocks.device)
        d = _scale(cls, blocks)
        qs = cls.layout.field(blocks, "qs").to(torch.int32)
        qh = cls.layout.field(blocks, "qh").to(torch.int32)
        # (n, m) bytes -> (n, m, 8) trits -> (n, k, m): run k holds trit k of each byte, in order.
        # Reordered while still int8 (a quarter of the bytes of the float32 result).
        runs = [table[part].unsqueeze(-1).view(torch.int8)[..., :k].transpose(1, 2).flatten(1)
                for part, k in ((qs[:, :32], 5), (qs[:, 32:], 5), (qh, 4))]
        return times_scale(torch.cat(runs, dim=1), d)


class TQ2_0(QuantType, qtype=T.TQ2_0, block_size=256, layout=Layout(("qs", U8, 64), ("d", F16, 1))):
    """2 bits per trit: ``y = (q - 1) * d``.

    Each 32-byte half of ``qs`` gives 128 elements: bits 2l..2l+1 of its 32 bytes are the l-th
    run of 32.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        qs = cls.layout.field(blocks, "qs").to(torch.int32).reshape(n, 2, 32)
        codes = _tq2_codes(blocks.device)[qs].unsqueeze(-1).view(torch.int8)  # (n, 2, 32, 4)
        trits = codes.transpose(2, 3).reshape(n, 256)  # reordered while still int8
        return times_scale(trits, _scale(cls, blocks))
