"""Bit-unpacking helpers shared by the legacy and K-quant codecs (private).

Everything here works on uint8 tensors of blocks, on any device, with torch ops only. Speed notes
that shaped these helpers (torch eager on CPU): integer work is done on bytes (1 B/element) so that
the float32 passes, which move 4 B/element, are as few as possible; outputs of elementwise ops are
kept contiguous, because a strided ``out=`` or a broadcast tensor-tensor shift falls off torch's
vectorized loops; small constant tensors are cached per device instead of rebuilt per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Layout

__all__ = [
    "DecodesInto",
    "IQ4_KVALUES",
    "const",
    "f16_scale",
    "iq4_values",
    "nibbles",
    "scale_min_k4",
]

#: The IQ4_NL / IQ4_XS non-linear codebook (ggml's ``kvalues_iq4nl``), indexed by the 4-bit code.
IQ4_KVALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10,
                                1, 13, 25, 38, 53, 69, 89, 113)


class DecodesInto:
    """Mixin for codecs written as :meth:`dequantize_into` (decode straight into a buffer).

    :func:`ggufvideo.quants.dequantize` hands float32 output slices (or, for fp16/bf16 output,
    one reused float32 scratch chunk) to ``dequantize_into``, so the float ops run in place on
    the destination instead of producing a fresh tensor that is then copied;
    ``dequantize_blocks`` (the registry's contract) allocates the buffer and calls it.
    """

    block_size: int

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """Decode ``(n_blocks, type_size)`` uint8 into ``(n_blocks, block_size)`` float32.

        Bit-identical to ggml's ``dequantize_row_*`` (see :meth:`dequantize_into`).
        """
        out = torch.empty((blocks.shape[0], cls.block_size), dtype=torch.float32,
                          device=blocks.device)
        cls.dequantize_into(blocks, out)
        return out

    @classmethod
    def dequantize_into(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Decode ``blocks`` into ``out``, a contiguous float32 ``(n_blocks, block_size)``."""
        raise NotImplementedError


_CONSTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def const(name: str, device: torch.device,
          make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A small constant tensor ``make()`` moved to ``device``, built once per (name, device)."""
    key = (name, device)
    t = _CONSTS.get(key)
    if t is None:
        t = make().to(device)
        _CONSTS[key] = t
    return t


def f16_scale(layout: Layout, blocks: torch.Tensor, name: str) -> torch.Tensor:
    """The float16 field ``name`` of every block as float32 ``(n_blocks, 1)`` (exact widening)."""
    return layout.field(blocks, name).to(torch.float32)


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Split bytes ``(..., k)`` into ``(..., 2, k)`` uint8: all low nibbles, then all high nibbles.

    This is the order every ggml 4-bit type stores its elements in: byte ``j`` of a run of ``k``
    holds element ``j`` in its low nibble and element ``j + k`` in its high nibble.
    """
    return torch.stack((torch.bitwise_and(qs, 15), torch.bitwise_right_shift(qs, 4)), dim=-2)


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12-byte field into 8 six-bit scales and 8 six-bit mins, ``(n, 8)`` uint8.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; scales/mins 4-7
    take their low 4 bits from the low/high nibble of bytes 8-11 and their top 2 bits from the
    spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    lo_s = scales[:, 0:4]
    lo_m = scales[:, 4:8]
    tail = scales[:, 8:12]
    sc = torch.cat((lo_s & 63, (tail & 15) | ((lo_s >> 6) << 4)), dim=1)
    mn = torch.cat((lo_m & 63, (tail >> 4) | ((lo_m >> 6) << 4)), dim=1)
    return sc, mn


def iq4_values(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the float32 codebook values of 4-bit ``codes`` (uint8 in 0..15) into ``out``.

    ``out`` is a contiguous float32 tensor with as many elements as ``codes``; it is returned
    viewed as ``codes.shape``. A gather from a 16-entry float table: the codebook is not affine,
    and one table lookup per element is cheaper in torch than any arithmetic reconstruction.
    """
    table = const("iq4_kvalues", codes.device,
                  lambda: torch.tensor(IQ4_KVALUES, dtype=torch.float32))
    flat = out.view(-1)
    torch.index_select(table, 0, codes.reshape(-1).long(), out=flat)
    return flat.view(codes.shape)
