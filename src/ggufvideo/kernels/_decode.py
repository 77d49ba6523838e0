"""Triton block decoders, one per ggml type, shared by the dequant and the fused matmul kernels.

This module imports triton at the top: only :mod:`ggufvideo.kernels` imports it, lazily.

Every decoder has the same shape of call::

    _decode_<type>(bp, s, l, F0, F1, F2, F3, F4, KV) -> float32 (R, NS, SL)

``bp`` is a ``(R, 1, 1)`` tensor of uint8 pointers, each to the first byte of one block;
``s`` is ``(1, NS, 1)`` and ``l`` is ``(1, 1, SL)`` int32 aranges, and element ``s * SL + l`` of a
block is produced (``NS * SL`` is the block size; see :data:`SPECS`). ``F0..F4`` are the byte
offsets of the type's fields in the order :data:`SPECS` names them -- read from the registry's
declared layout, never written down here. ``KV`` points to the IQ4 codebook as float32 (unused by
other types).

Exactness: each decoder does ggml's float32 operations in ggml's order (scale products first,
then the product with the quant, then a separate subtraction or addition). The kernels are
compiled with ``enable_fp_fusion=False`` so ``a * b - c`` stays two roundings, as in ggml's
reference build and in the torch path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _u8(p):
    """Load bytes as int32 (all index/bit arithmetic is done in int32)."""
    return tl.load(p).to(tl.int32)


@triton.jit
def _f16(p):
    """A little-endian float16 at ``p`` (any alignment) as float32; the widening is exact."""
    bits = tl.load(p).to(tl.uint16) | (tl.load(p + 1).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _i8(p):
    """Load signed bytes as int32."""
    return tl.load(p.to(tl.pointer_type(tl.int8))).to(tl.int32)


# -- 32-element blocks: NS=2 halves of SL=16 (element = half*16 + l), Q8_0: NS=1, SL=32 --------

@triton.jit
def _decode_q4_0(bp, s, l, F_D, F_QS, F2, F3, F4, KV):
    d = _f16(bp + F_D)
    q = (_u8(bp + F_QS + l) >> (4 * s)) & 15
    return (q - 8).to(tl.float32) * d


@triton.jit
def _decode_q4_1(bp, s, l, F_D, F_M, F_QS, F3, F4, KV):
    d = _f16(bp + F_D)
    m = _f16(bp + F_M)
    q = (_u8(bp + F_QS + l) >> (4 * s)) & 15
    return q.to(tl.float32) * d + m


@triton.jit
def _fifth_bit(bp, F_QH, s, l):
    """Bit ``e`` of the little-endian u32 ``qh``, for element ``e = s*16 + l``."""
    e = s * 16 + l
    return (_u8(bp + F_QH + (e >> 3)) >> (e & 7)) & 1


@triton.jit
def _decode_q5_0(bp, s, l, F_D, F_QH, F_QS, F3, F4, KV):
    d = _f16(bp + F_D)
    q = ((_u8(bp + F_QS + l) >> (4 * s)) & 15) | (_fifth_bit(bp, F_QH, s, l) << 4)
    return (q - 16).to(tl.float32) * d


@triton.jit
def _decode_q5_1(bp, s, l, F_D, F_M, F_QH, F_QS, F4, KV):
    d = _f16(bp + F_D)
    m = _f16(bp + F_M)
    q = ((_u8(bp + F_QS + l) >> (4 * s)) & 15) | (_fifth_bit(bp, F_QH, s, l) << 4)
    return q.to(tl.float32) * d + m


@triton.jit
def _decode_q8_0(bp, s, l, F_D, F_QS, F2, F3, F4, KV):
    d = _f16(bp + F_D)
    return _i8(bp + F_QS + s * 32 + l).to(tl.float32) * d


@triton.jit
def _decode_iq4_nl(bp, s, l, F_D, F_QS, F2, F3, F4, KV):
    d = _f16(bp + F_D)
    q = (_u8(bp + F_QS + l) >> (4 * s)) & 15
    # float products commute: d * kv == kv * d bit for bit.
    return d * tl.load(KV + q)


# -- 256-element super-blocks ----------------------------------------------------------------

@triton.jit
def _decode_q2_k(bp, s, l, F_SC, F_QS, F_D, F_DMIN, F4, KV):
    # NS=16 sub-blocks of SL=16. Element e = half*128 + j*32 + ll holds bits 2j..2j+1 of
    # qs[half*32 + ll]; for e = s*16 + l: half = s>>3, j = (s>>1)&3, ll = (s&1)*16 + l.
    d = _f16(bp + F_D)
    dmin = _f16(bp + F_DMIN)
    sc = _u8(bp + F_SC + s)
    dl = d * (sc & 15).to(tl.float32)
    ml = dmin * (sc >> 4).to(tl.float32)
    byte = _u8(bp + F_QS + (s >> 3) * 32 + (s & 1) * 16 + l)
    q = (byte >> (2 * ((s >> 1) & 3))) & 3
    return dl * q.to(tl.float32) - ml


@triton.jit
def _decode_q3_k(bp, s, l, F_HM, F_QS, F_SC, F_D, F4, KV):
    # NS=16 x SL=16; low 2 bits placed as Q2_K's, the high bit is bit (e>>5) of hmask[e & 31].
    d = _f16(bp + F_D)
    lo = (_u8(bp + F_SC + (s & 7)) >> (4 * (s >> 3))) & 15
    hi = (_u8(bp + F_SC + 8 + (s & 3)) >> (2 * (s >> 2))) & 3
    dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)
    ll = (s & 1) * 16 + l
    q = (_u8(bp + F_QS + (s >> 3) * 32 + ll) >> (2 * ((s >> 1) & 3))) & 3
    hbit = (_u8(bp + F_HM + ll) >> (s >> 1)) & 1
    q = q - 4 + 4 * hbit  # ggml subtracts 4 where the mask bit is clear
    return dl * q.to(tl.float32)


@triton.jit
def _scale_min_k4(bp, F_SC, s):
    """Q4_K/Q5_K's six-bit scale and min of sub-block ``s`` (0..7), unpacked from 12 bytes."""
    lo = s < 4
    a = _u8(bp + F_SC + s)                     # s<4: scale byte s
    b = _u8(bp + F_SC + s + 4)                 # s<4: min byte s+4; s>=4: low nibbles byte s+4
    c = _u8(bp + F_SC + tl.where(lo, s, s - 4))  # s>=4: top bits of scale from byte s-4
    sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def _decode_kq45(bp, s, l, F_D, F_DMIN, F_SC, F_QH, F_QS, HAS_QH: tl.constexpr):
    # NS=8 sub-blocks of SL=32: sub-block s is the low (s even) or high nibble of qs[(s>>1)*32 + l];
    # Q5_K adds a fifth bit: bit s of qh[l].
    d = _f16(bp + F_D)
    dmin = _f16(bp + F_DMIN)
    sc, mn = _scale_min_k4(bp, F_SC, s)
    d1 = d * sc.to(tl.float32)
    m1 = dmin * mn.to(tl.float32)
    q = (_u8(bp + F_QS + (s >> 1) * 32 + l) >> (4 * (s & 1))) & 15
    if HAS_QH:
        q = q | (((_u8(bp + F_QH + l) >> s) & 1) << 4)
    return d1 * q.to(tl.float32) - m1


@triton.jit
def _decode_q4_k(bp, s, l, F_D, F_DMIN, F_SC, F_QS, F4, KV):
    return _decode_kq45(bp, s, l, F_D, F_DMIN, F_SC, 0, F_QS, False)


@triton.jit
def _decode_q5_k(bp, s, l, F_D, F_DMIN, F_SC, F_QH, F_QS, KV):
    return _decode_kq45(bp, s, l, F_D, F_DMIN, F_SC, F_QH, F_QS, True)


@triton.jit
def _decode_q6_k(bp, s, l, F_QL, F_QH, F_SC, F_D, F4, KV):
    # NS=16 x SL=16. Within half h = s>>3, r = (s&7)*16 + l in 0..127: low nibble pair from
    # ql[h*64 + (r & 63)] (nibble r>>6), top two bits from qh[h*32 + (r & 31)] (pair r>>5).
    d = _f16(bp + F_D)
    dl = d * _i8(bp + F_SC + s).to(tl.float32)
    h = s >> 3
    r = (s & 7) * 16 + l
    lo = (_u8(bp + F_QL + h * 64 + (r & 63)) >> (4 * (r >> 6))) & 15
    hi = (_u8(bp + F_QH + h * 32 + (r & 31)) >> (2 * (r >> 5))) & 3
    q = (lo | (hi << 4)) - 32
    return dl * q.to(tl.float32)


@triton.jit
def _decode_iq4_xs(bp, s, l, F_D, F_SH, F_SL, F_QS, F4, KV):
    # NS=8 sub-blocks of SL=32: nibble (l>>4) of qs[s*16 + (l & 15)]; six-bit scale from a nibble
    # of scales_l and two bits of the u16 scales_h.
    d = _f16(bp + F_D)
    sh = _u8(bp + F_SH) | (_u8(bp + F_SH + 1) << 8)
    ls = ((_u8(bp + F_SL + (s >> 1)) >> (4 * (s & 1))) & 15) | (((sh >> (2 * s)) & 3) << 4)
    dl = d * (ls - 32).to(tl.float32)
    q = (_u8(bp + F_QS + s * 16 + (l & 15)) >> (4 * (l >> 4))) & 15
    return dl * tl.load(KV + q)


# -- storage-order decoders: each byte read once, its two nibbles giving two value tiles ---------
# ``_parts_<type>(bp, F0..F4, KV) -> (w0, w1, idx, HI)``: float32 tiles w0/w1 of the same shape,
# ``idx`` the in-block element index of w0's entries (built from aranges, so its last dimension is
# contiguous), and w1 holds elements ``idx + HI``. Used where byte loads dominate (Q6_K's 210-byte
# and IQ4_XS's 136-byte blocks defeat wide loads): half the load instructions per element.

@triton.jit
def _parts_q6_k(bp, F_QL, F_QH, F_SC, F_D, F4, KV):
    # bp (R, 1, 1). Half h (128 elements) = 64 ql bytes (h, q4, l16): the low nibble of
    # ql[h*64 + q4*16 + l16] is element h*128 + q4*16 + l16 (sub-block h*8 + q4), the high nibble
    # element +64 (sub-block h*8 + 4 + q4). Their top two bits are pair (q4>>1) resp. 2 + (q4>>1)
    # of qh[h*32 + (q4&1)*16 + l16].
    h = tl.arange(0, 2)[None, :, None, None]
    q4 = tl.arange(0, 4)[None, None, :, None]
    l = tl.arange(0, 16)[None, None, None, :]
    bp = tl.expand_dims(bp, 3)
    d = _f16(bp + F_D)
    s0 = h * 8 + q4
    dl0 = d * _i8(bp + F_SC + s0).to(tl.float32)
    dl1 = d * _i8(bp + F_SC + s0 + 4).to(tl.float32)
    ql = _u8(bp + F_QL + h * 64 + q4 * 16 + l)
    qh = _u8(bp + F_QH + h * 32 + (q4 & 1) * 16 + l)
    sh = 2 * (q4 >> 1)
    v0 = ((ql & 15) | (((qh >> sh) & 3) << 4)) - 32
    v1 = ((ql >> 4) | (((qh >> (sh + 4)) & 3) << 4)) - 32
    return dl0 * v0.to(tl.float32), dl1 * v1.to(tl.float32), h * 128 + q4 * 16 + l, 64


@triton.jit
def _parts_iq4_xs(bp, F_D, F_SH, F_SL, F_QS, F4, KV):
    # bp (R, 1, 1). Sub-block s: byte qs[s*16 + l] holds element s*32 + l (low nibble) and
    # s*32 + 16 + l (high nibble).
    s = tl.arange(0, 8)[None, :, None]
    l = tl.arange(0, 16)[None, None, :]
    d = _f16(bp + F_D)
    sh = _u8(bp + F_SH) | (_u8(bp + F_SH + 1) << 8)
    ls = ((_u8(bp + F_SL + (s >> 1)) >> (4 * (s & 1))) & 15) | (((sh >> (2 * s)) & 3) << 4)
    dl = d * (ls - 32).to(tl.float32)
    q = _u8(bp + F_QS + s * 16 + l)
    return dl * tl.load(KV + (q & 15)), dl * tl.load(KV + (q >> 4)), s * 32 + l, 16


#: Types whose dequant kernel uses a storage-order decoder -> (parts decoder, tile rank).
PARTS = {"Q6_K": (_parts_q6_k, 4), "IQ4_XS": (_parts_iq4_xs, 3)}


@triton.jit
def to_out(vals, OUT: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round float32 ``vals`` once, to nearest even, into ``OUT``.

    ``SOFT_BF16`` rounds to bfloat16 with integer operations instead of the hardware conversion;
    it is for Triton's interpreter, whose float32 -> bfloat16 cast does not round to nearest even.
    """
    if OUT == tl.float32:
        return vals
    elif OUT == tl.bfloat16 and SOFT_BF16:
        bits = vals.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(vals != vals, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return vals.to(OUT, fp_downcast_rounding="rtne")


#: qtype name -> (decoder, NS, SL, field names giving F0..F4 in order).
SPECS: dict[str, tuple[object, int, int, tuple[str, ...]]] = {
    "Q4_0": (_decode_q4_0, 2, 16, ("d", "qs")),
    "Q4_1": (_decode_q4_1, 2, 16, ("d", "m", "qs")),
    "Q5_0": (_decode_q5_0, 2, 16, ("d", "qh", "qs")),
    "Q5_1": (_decode_q5_1, 2, 16, ("d", "m", "qh", "qs")),
    "Q8_0": (_decode_q8_0, 1, 32, ("d", "qs")),
    "IQ4_NL": (_decode_iq4_nl, 2, 16, ("d", "qs")),
    "Q2_K": (_decode_q2_k, 16, 16, ("scales", "qs", "d", "dmin")),
    "Q3_K": (_decode_q3_k, 16, 16, ("hmask", "qs", "scales", "d")),
    "Q4_K": (_decode_q4_k, 8, 32, ("d", "dmin", "scales", "qs")),
    "Q5_K": (_decode_q5_k, 8, 32, ("d", "dmin", "scales", "qh", "qs")),
    "Q6_K": (_decode_q6_k, 16, 16, ("ql", "qh", "scales", "d")),
    "IQ4_XS": (_decode_iq4_xs, 8, 32, ("d", "scales_h", "scales_l", "qs")),
}


@triton.jit
def decode_tile(DECODE: tl.constexpr, bp, NS: tl.constexpr, SL: tl.constexpr,
                F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                F4: tl.constexpr, KV):
    """Decode the blocks at ``bp`` (R, 1, 1) into float32 ``(R, NS * SL)``."""
    s = tl.arange(0, NS)[None, :, None]
    l = tl.arange(0, SL)[None, None, :]
    vals = DECODE(bp, s, l, F0, F1, F2, F3, F4, KV)
    return tl.reshape(vals, (vals.shape[0], NS * SL))


__all__ = ["PARTS", "SPECS", "decode_tile", "to_out", "triton", "tl"]
