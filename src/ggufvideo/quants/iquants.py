"""The codebook ("i-quant") types: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S.

Every one of them cuts a 256-element super-block into 8 sub-blocks of 32 and spells each sub-block
as grid points (rows of 8 or 4 small integers) picked from a fixed lattice codebook, with a sign
bit per element (IQ2/IQ3) or a shared offset (IQ1), times a per-sub-block scale derived from the
f16 super-block scale.

Their lattice grids and the IQ2/IQ3 sign table are data, not code: they are taken at run time from
gguf-py (a runtime dependency), which carries ggml's tables, rather than duplicated here. Each table
is built once per device on first use.

Dequantization follows ggml's ``dequantize_row_*`` in float32: the sub-block scale is rounded
exactly where ggml rounds it, and each element is one rounded product, ``scale * grid`` with the
±1 sign applied exactly (see :func:`_signed_scaled`), or ``scale * (grid + delta)`` for IQ1, so
the result is bit-identical.
"""

from __future__ import annotations

import functools

import gguf.quants
import torch
from gguf import GGMLQuantizationType as T

from .base import F16, U8, U16, Layout, QuantType

__all__ = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]

#: ggml's ``IQ1S_DELTA``: IQ1 grid points are shifted by ±this before scaling.
IQ1_DELTA = 0.125


# -- lookup tables (from gguf-py, cached per device) -------------------------------------------
#
# Tables are kept packed: one integer per grid point (int64 for 8 coordinates, int32 for 4) whose
# little-endian bytes are the coordinates as int8, and likewise one int64 per sign pattern whose
# bytes are ±1. A lookup is then a gather of one word per 8 (or 4) elements and a free
# reinterpretation as int8, rather than a gather of float rows, which is several times slower on
# a GPU. (Bytes in memory are little-endian on every device torch runs on.)

@functools.cache
def _grid(qtype: T, device: torch.device) -> torch.Tensor:
    """The lattice codebook of ``qtype`` packed one point per word, on ``device``.

    gguf-py stores each codebook packed (2 or 3 bits per coordinate, hex-encoded) and expands it
    with ``init_grid()`` into float32 coordinates, which are small integers (|c| <= 62), so they
    fit int8 exactly. Returns int64 ``(n_points,)`` for 8-coordinate grids, int32 for 4.
    """
    quant = getattr(gguf.quants, qtype.name)
    quant.init_grid()
    coords = torch.from_numpy(quant.grid.reshape(quant.grid_shape).copy())
    word = {8: torch.int64, 4: torch.int32}[coords.shape[1]]
    packed = coords.to(torch.int8).contiguous().view(word).reshape(-1)
    return packed.to(device)


@functools.cache
def _signs(with_parity: bool, device: torch.device) -> torch.Tensor:
    """Sign patterns as int64 words whose byte j is ±1 (int8): bit j of the sign byte → element j.

    ``with_parity``: indexed by a 7-bit code and expanded through ggml's ``ksigns_iq2xs`` table
    (taken from gguf-py), whose 8th bit makes the count of minus signs even (128 words).
    Otherwise indexed by a plain sign byte (IQ2_S, IQ3_S; 256 words).
    """
    if with_parity:
        codes = torch.frombuffer(bytearray(gguf.quants.IQ2_XXS.ksigns), dtype=torch.uint8)
    else:
        codes = torch.arange(256, dtype=torch.uint8)
    bits = (codes.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    pm1 = (1 - 2 * bits).to(torch.int8).contiguous()
    return pm1.view(torch.int64).reshape(-1).to(device)


@functools.cache
def _shifts(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int64 constant (bit shifts) on ``device``, made once rather than per call."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` reinterpreted as int8: ``(..., k)`` indices → ``(..., k * word_bytes)``."""
    return table[index].view(torch.int8)


# -- byte helpers ------------------------------------------------------------------------------

def _bytes(cls: type[QuantType], blocks: torch.Tensor, name: str) -> torch.Tensor:
    """The raw bytes of field ``name`` of every block, ``(n_blocks, nbytes)`` uint8 (no copy)."""
    f = cls.layout[name]
    return blocks[:, f.offset:f.offset + f.nbytes]


def _le(raw: torch.Tensor, width: int) -> torch.Tensor:
    """Little-endian unsigned words of ``width`` bytes from uint8 ``(..., k*width)``, as int64.

    Built from bytes rather than viewed as uint16/uint32 so it works on any device and never sees
    a signed reinterpretation of the top bit.
    """
    b = raw.reshape(*raw.shape[:-1], raw.shape[-1] // width, width).to(torch.int64)
    word = b[..., 0]
    for i in range(1, width):
        word = word | (b[..., i] << (8 * i))
    return word


def _scale(cls: type[QuantType], blocks: torch.Tensor) -> torch.Tensor:
    """The f16 super-block scale ``d`` as float32 ``(n_blocks, 1)``."""
    return cls.layout.field(blocks, "d").to(torch.float32)


def _nibbles(raw: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, k)`` → int32 ``(n, 2k)``: low nibble of byte i at 2i, high nibble at 2i+1."""
    r = raw.to(torch.int32)
    return torch.stack((r & 0xF, r >> 4), dim=-1).reshape(raw.shape[0], 2 * raw.shape[1])


def times_scale(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float32(values) * scale`` for small-integer ``values`` (exactly representable), broadcast.

    One rounding per element, as ggml's ``q * d``. On CUDA the int-to-float cast fuses into the
    multiply kernel; on CPU a mixed-dtype multiply materialises the cast anyway, so the product is
    taken in place on the cast copy, which saves a pass over the float32 result. Shared by the
    IQ, ternary and MXFP4 decoders.
    """
    if values.device.type == "cpu":
        return values.to(torch.float32).mul_(scale)
    return values * scale


def _signed_scaled(db: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """ggml's ``db * grid[j] * sign[j]`` for int8 ``grid`` and ``signs`` (±1), float32 ``db``.

    Computed as ``db * (grid * sign)``: the sign product is exact in int8, and round-to-nearest
    is symmetric, so ``db * (-g)`` is bit for bit ``-(db * g)``, signed zeros included; the result
    is identical to ggml's and needs one float pass instead of two.
    """
    return times_scale(grid * signs, db)


# -- codecs ------------------------------------------------------------------------------------

class IQ2_XXS(QuantType, qtype=T.IQ2_XXS, block_size=256,
              layout=Layout(("d", F16, 1), ("qs", U16, 32))):
    """2.06 bits/weight: 8-element grid points with sign patterns, 4-bit sub-block scales.

    Each sub-block of 32 is 8 bytes: four grid indices (one byte each), then a little-endian u32
    holding four 7-bit sign codes (bits 0-27) and the scale ``ls`` (bits 28-31);
    ``db = d * (0.5 + ls) * 0.25``.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _scale(cls, blocks)
        sub = _bytes(cls, blocks, "qs").reshape(n, 8, 8)
        idx = sub[..., :4].to(torch.int32)                                  # (n, 8, 4)
        aux = _le(sub[..., 4:], 4).reshape(n, 8)                            # (n, 8)
        db = d * (0.5 + (aux >> 28).to(torch.float32)) * 0.25               # (n, 8)
        codes = (aux.unsqueeze(-1) >> _shifts((0, 7, 14, 21), dev)) & 127  # (n, 8, 4)
        grid = _lookup(_grid(cls.qtype, dev), idx)                          # (n, 8, 32)
        signs = _lookup(_signs(True, dev), codes)
        return _signed_scaled(db[..., None], grid, signs).reshape(n, 256)


class IQ2_XS(QuantType, qtype=T.IQ2_XS, block_size=256,
             layout=Layout(("d", F16, 1), ("qs", U16, 32), ("scales", U8, 8))):
    """2.31 bits/weight: each u16 of ``qs`` is a 9-bit grid index and a 7-bit sign code.

    ``scales[i]`` holds two 4-bit scales for sub-block i: the low nibble for its first 16
    elements, the high nibble for the last 16; ``db = d * (0.5 + ls) * 0.25``.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _scale(cls, blocks)
        q = _le(_bytes(cls, blocks, "qs"), 2)                               # (n, 32)
        ls = _nibbles(_bytes(cls, blocks, "scales")).to(torch.float32)      # (n, 16)
        db = d * (0.5 + ls) * 0.25                                          # one per 16 elements
        grid = _lookup(_grid(cls.qtype, dev), q & 511).reshape(n, 16, 16)
        signs = _lookup(_signs(True, dev), q >> 9).reshape(n, 16, 16)
        return _signed_scaled(db[..., None], grid, signs).reshape(n, 256)


class IQ2_S(QuantType, qtype=T.IQ2_S, block_size=256,
            layout=Layout(("d", F16, 1), ("qs", U8, 64), ("qh", U8, 8), ("scales", U8, 8))):
    """2.5 bits/weight (``qs`` holds 32 grid indices low bytes then 32 sign bytes).

    Grid index of group g (8 elements) of sub-block i: ``qs[4i+g]`` plus bits 2g..2g+1 of
    ``qh[i]`` as bits 8-9; its signs are the plain byte ``qs[32+4i+g]``. Scales as IQ2_XS.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _scale(cls, blocks)
        qs = _bytes(cls, blocks, "qs")
        low = qs[:, :32].to(torch.int64).reshape(n, 8, 4)
        qh = _bytes(cls, blocks, "qh").to(torch.int64).unsqueeze(-1)        # (n, 8, 1)
        idx = low | (((qh >> _shifts((0, 2, 4, 6), dev)) & 3) << 8)         # (n, 8, 4)
        ls = _nibbles(_bytes(cls, blocks, "scales")).to(torch.float32)      # (n, 16)
        db = d * (0.5 + ls) * 0.25
        grid = _lookup(_grid(cls.qtype, dev), idx).reshape(n, 16, 16)
        signs = _lookup(_signs(False, dev), qs[:, 32:].to(torch.int32)).reshape(n, 16, 16)
        return _signed_scaled(db[..., None], grid, signs).reshape(n, 256)


class IQ3_XXS(QuantType, qtype=T.IQ3_XXS, block_size=256,
              layout=Layout(("d", F16, 1), ("qs", U8, 96))):
    """3.06 bits/weight: 4-element grid points; the last 32 bytes of ``qs`` hold scales and signs.

    ``qs[0:64]``: one grid index per 4 elements. ``qs[64:96]``: a little-endian u32 per sub-block
    with four 7-bit sign codes (one per 8 elements) and the scale in bits 28-31;
    ``db = d * (0.5 + ls) * 0.5``.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _scale(cls, blocks)
        qs = _bytes(cls, blocks, "qs")
        idx = qs[:, :64].to(torch.int32).reshape(n, 8, 8)
        aux = _le(qs[:, 64:], 4)                                            # (n, 8)
        db = d * (0.5 + (aux >> 28).to(torch.float32)) * 0.5
        codes = (aux.unsqueeze(-1) >> _shifts((0, 7, 14, 21), dev)) & 127  # (n, 8, 4)
        grid = _lookup(_grid(cls.qtype, dev), idx)                          # (n, 8, 32)
        signs = _lookup(_signs(True, dev), codes)                           # (n, 8, 32)
        return _signed_scaled(db[..., None], grid, signs).reshape(n, 256)


class IQ3_S(QuantType, qtype=T.IQ3_S, block_size=256,
            layout=Layout(("d", F16, 1), ("qs", U8, 64), ("qh", U8, 8), ("signs", U8, 32),
                          ("scales", U8, 4))):
    """3.44 bits/weight.

    Grid index of the k-th 4-element point of sub-block i: ``qs[8i+k]`` plus bit k of ``qh[i]``
    as bit 8. ``signs`` is one plain byte per 8 elements. ``scales[j]`` holds the 4-bit scales of
    sub-blocks 2j (low nibble) and 2j+1 (high); ``db = d * (1 + 2*ls)``.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _scale(cls, blocks)
        low = _bytes(cls, blocks, "qs").to(torch.int64).reshape(n, 8, 8)
        qh = _bytes(cls, blocks, "qh").to(torch.int64).unsqueeze(-1)        # (n, 8, 1)
        idx = low | (((qh >> _shifts(tuple(range(8)), dev)) & 1) << 8)      # (n, 8, 8)
        ls = _nibbles(_bytes(cls, blocks, "scales"))                        # (n, 8) int
        db = d * (1 + 2 * ls).to(torch.float32)                             # (n, 8)
        grid = _lookup(_grid(cls.qtype, dev), idx)                          # (n, 8, 32)
        sign_bytes = _bytes(cls, blocks, "signs").to(torch.int32)
        signs = _lookup(_signs(False, dev), sign_bytes).reshape(n, 8, 32)
        return _signed_scaled(db[..., None], grid, signs).reshape(n, 256)


class IQ1_S(QuantType, qtype=T.IQ1_S, block_size=256,
            layout=Layout(("d", F16, 1), ("qs", U8, 32), ("qh", U16, 8))):
    """1.56 bits/weight: ``y = dl * (grid + delta)``, grid coordinates in {-1, 0, 1}.

    ``qh[i]`` (u16) for sub-block i: bits 3g..3g+2 are bits 8-10 of group g's grid index (low
    byte ``qs[4i+g]``), bits 12-14 the scale ``ls`` (``dl = d * (2*ls + 1)``), bit 15 the sign of
    ``delta`` (±IQ1_DELTA).
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        d = _scale(cls, blocks)
        qh = _le(_bytes(cls, blocks, "qh"), 2)                              # (n, 8)
        low = _bytes(cls, blocks, "qs").to(torch.int64).reshape(n, 8, 4)
        idx = low | (((qh.unsqueeze(-1) >> _shifts((0, 3, 6, 9), dev)) & 7) << 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)               # (n, 8)
        delta = torch.where((qh & 0x8000) != 0, -IQ1_DELTA, IQ1_DELTA).to(torch.float32)
        grid = _lookup(_grid(cls.qtype, dev), idx)                          # (n, 8, 32) int8
        # int8 + float32 promotes exactly: float(grid) + delta, as ggml; then one rounded product.
        return (grid + delta[..., None]).mul_(dl[..., None]).reshape(n, 256)


class IQ1_M(QuantType, qtype=T.IQ1_M, block_size=256,
            layout=Layout(("qs", U8, 32), ("qh", U8, 16), ("scales", U8, 8))):
    """1.75 bits/weight; the super-block scale is spread over the top nibbles of ``scales``.

    ``scales`` is four little-endian u16: their bits 0-11 are sixteen 3-bit scales (one per 16
    elements, ``dl = d * (2*ls + 1)``), their top nibbles, in order, the f16 ``d``. Each nibble
    of ``qh`` belongs to one 8-element group: bits 0-2 are bits 8-10 of its grid index (low byte
    in ``qs``), bit 3 the sign of its ``delta``. The grid is IQ1_S's.
    """

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        n, dev = blocks.shape[0], blocks.device
        sc_raw = _bytes(cls, blocks, "scales")
        # The f16 bits of d are the top nibbles of the four u16, i.e. of bytes 1, 3, 5, 7.
        top = sc_raw[:, 1::2] >> 4                                          # (n, 4) uint8
        d_bytes = torch.stack((top[:, 0] | (top[:, 1] << 4), top[:, 2] | (top[:, 3] << 4)), dim=-1)
        d = d_bytes.contiguous().view(torch.float16).to(torch.float32)       # (n, 1)
        sc = _le(sc_raw, 2).unsqueeze(-1)                                   # (n, 4, 1)
        ls = (sc >> _shifts((0, 3, 6, 9), dev)) & 7                         # (n, 4, 4)
        dl = d * (2 * ls.reshape(n, 16) + 1).to(torch.float32)              # one per 16 elements
        nib = _nibbles(_bytes(cls, blocks, "qh"))                           # (n, 32): one per group
        idx = _bytes(cls, blocks, "qs").to(torch.int32) | ((nib & 7) << 8)
        delta = torch.where((nib & 8) != 0, -IQ1_DELTA, IQ1_DELTA).to(torch.float32)
        grid = _lookup(_grid(T.IQ1_S, dev), idx).reshape(n, 16, 2, 8)
        return (grid + delta.reshape(n, 16, 2, 1)).mul_(dl[..., None, None]).reshape(n, 256)
