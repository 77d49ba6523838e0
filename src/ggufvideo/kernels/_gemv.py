"""The GEMV kernel: one to four activation rows on the CUDA cores, the scale applied per weight.

Dispatch (which types and row counts take it): :mod:`._matmul` and :mod:`.settings`.

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

from ._decode import _i8, tl, triton
from ._fused_common import _half, _k4_affine, _k4_head, _row_offsets, _store_rows

__all__ = ["GEMV_STEPS"]


# -- one activation row: the GEMV kernel -----------------------------------------------------------
# Each step adds ``(D * u + MB) * x`` element by element into a per-thread float32 tile ``acc``
# (BN, A, B) that is summed once at the end: per weight that is one code extraction, one
# subtraction (the bit-pattern trick), two FMAs and the activation's widening, with no per-chunk
# reductions. Codes are extracted from whole 32- or 16-bit units (one load feeds 4 or 2 bytes);
# ``cols`` (1, A, B) gives each tile entry's activation column. ``xp`` points at this step's
# first activation. ``acc`` is a tuple of four such tiles: activation rows 0..BM-1 (BM = 1, 2 or
# 4), row i at ``xp + xr[i - 1]``; each weight is decoded once for all of them.

@triton.jit
def _units(p, i, UNIT: tl.constexpr):
    """``UNIT`` (int16/int32) values ``i`` units past byte pointer ``p``, as int32.

    The pointer is cast before the index is added, so Triton sees ``i``'s contiguity in units
    and loads runs of them as wide vectors (casting after adding byte offsets hides it).
    """
    return tl.load(p.to(tl.pointer_type(UNIT)) + i).to(tl.int32)


@triton.jit
def _code_f32(packed, k, magic, SOFT: tl.constexpr):
    """Byte ``k`` of int32 ``packed`` (a code < 256) as the float32 bits ``2**23 + code``.

    One ``prmt`` (byte permute) per code on the GPU: it takes byte ``k`` of ``packed`` and the
    three high bytes of ``magic`` (0x4B000000) in one instruction, where shift + bit-field
    extract + or take three. The interpreter cannot run PTX and gets the same bits by shifts.
    """
    if SOFT:
        return ((packed >> (8 * k)) & 255) | magic
    return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                     [packed, magic, 0x7650 + k], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _gemv_mac_bits(acc, bits, D, MB, xp, xr, cols, SUB: tl.constexpr, BM: tl.constexpr):
    """``acc[i] += (D * (code - SUB) + MB) * x_i[cols]`` for activation rows ``i < BM``, with
    ``bits`` = the float32 ``2**23 + code``."""
    uf = bits.to(tl.float32, bitcast=True) - (8388608.0 + SUB)
    wv = D * uf + MB
    a0 = acc[0] + wv * tl.load(xp + cols).to(tl.float32)
    a1 = acc[1]
    a2 = acc[2]
    a3 = acc[3]
    if BM > 1:
        a1 = a1 + wv * tl.load(xp + xr[0] + cols).to(tl.float32)
    if BM > 2:
        a2 = a2 + wv * tl.load(xp + xr[1] + cols).to(tl.float32)
        a3 = a3 + wv * tl.load(xp + xr[2] + cols).to(tl.float32)
    return a0, a1, a2, a3


@triton.jit
def _gemv_q8_0(acc, bp, xp, xr, magic, F_D, F_QS, F2, F3, F4, TS: tl.constexpr,
               BM: tl.constexpr, SOFT: tl.constexpr):
    # (BN, 16 halves, 2 bytes) per block; a signed byte q becomes the code q + 128 by flipping its
    # top bit, and SUB = 128 takes it back.
    v = tl.arange(0, 16)[None, :, None]
    b = tl.arange(0, 2)[None, None, :]
    for kb in tl.static_range(8):
        p = bp + kb * TS
        d = _half(p + F_D)
        h = _units(p + F_QS, v, tl.int16)
        u = h ^ 0x8080  # both bytes' sign bits flipped: codes q + 128
        acc = _gemv_mac_bits(acc, _code_f32(u, b, magic, SOFT), d, 0.0, xp, xr,
                             kb * 32 + 2 * v + b, 128.0, BM)
    return acc


@triton.jit
def _gemv_q4_0(acc, bp, xp, xr, magic, F_D, F_QS, F2, F3, F4, TS: tl.constexpr,
               BM: tl.constexpr, SOFT: tl.constexpr):
    # (BN, 8 halves, 2 bytes) per block: byte 2v + b holds element 2v + b in its low nibble and
    # element + 16 in its high nibble; the weight is d * (code - 8), SUB = 8 takes the offset.
    v = tl.arange(0, 8)[None, :, None]
    b = tl.arange(0, 2)[None, None, :]
    for kb in tl.static_range(8):
        p = bp + kb * TS
        d = _half(p + F_D)
        h = _units(p + F_QS, v, tl.int16)
        for hi in tl.static_range(2):
            nib = (h >> (4 * hi)) & 0x0F0F
            acc = _gemv_mac_bits(acc, _code_f32(nib, b, magic, SOFT), d, 0.0, xp, xr,
                                 kb * 32 + 16 * hi + 2 * v + b, 8.0, BM)
    return acc


@triton.jit
def _gemv_kq45(acc, bp, xp, xr, magic, F_D, F_DMIN, F_SC, F_QH, F_QS, HAS_QH: tl.constexpr,
               BM: tl.constexpr, SOFT: tl.constexpr):
    # (BN, 8 words, 4 bytes) per qs group g: byte 4t+b holds element g*64 + 4t + b (sub-block 2g)
    # in its low nibble and element + 32 (sub-block 2g+1) in its high nibble; Q5_K's fifth bit of
    # sub-block s is bit s of qh[4t + b]. Nibbles are masked four per word, then placed one per
    # lane by _code_f32.
    t = tl.arange(0, 8)[None, :, None]
    b = tl.arange(0, 4)[None, None, :]
    d, dmin, s0, s1, s2 = _k4_head(bp, F_D, F_SC)
    if HAS_QH:
        qh = _units(bp + F_QH, t, tl.int32)
    for g in tl.static_range(4):
        q = _units(bp + F_QS + g * 32, t, tl.int32)  # (BN, 8, 1): four codes per word
        for hi in tl.static_range(2):
            s = 2 * g + hi
            D, MB = _k4_affine(d, dmin, s0, s1, s2, s, magic)
            nib = (q >> (4 * hi)) & 0x0F0F0F0F
            if HAS_QH:
                nib = nib | (((qh >> s) & 0x01010101) << 4)
            acc = _gemv_mac_bits(acc, _code_f32(nib, b, magic, SOFT), D, MB, xp, xr,
                                 g * 64 + 32 * hi + 4 * t + b, 0.0, BM)
    return acc


@triton.jit
def _gemv_q5_k(acc, bp, xp, xr, magic, F0, F1, F2, F3, F4, TS: tl.constexpr,
               BM: tl.constexpr, SOFT: tl.constexpr):
    return _gemv_kq45(acc, bp, xp, xr, magic, F0, F1, F2, F3, F4, True, BM, SOFT)


@triton.jit
def _gemv_q6_k(acc, bp, xp, xr, magic, F_QL, F_QH, F_SC, F_D, F4, TS: tl.constexpr,
               BM: tl.constexpr, SOFT: tl.constexpr):
    # (BN, 8 halves, 2 bytes): as _step_q6_k, sub-block s = h*8 + 4*hi + j covers elements
    # h*128 + 64*hi + j*16 + 2v + b; 6-bit codes, weight sc * d * (u - 32).
    v = tl.arange(0, 8)[None, :, None]
    b = tl.arange(0, 2)[None, None, :]
    d = _half(bp + F_D)
    for h in tl.static_range(2):
        for j in tl.static_range(4):
            ql = _units(bp + F_QL + h * 64 + j * 16, v, tl.int16)
            qh = _units(bp + F_QH + h * 32 + (j & 1) * 16, v, tl.int16) >> (2 * (j >> 1))
            for hi in tl.static_range(2):
                dl = d * _i8(bp + F_SC + h * 8 + 4 * hi + j).to(tl.float32)
                u = ((ql >> (4 * hi)) & 0x0F0F) | (((qh >> (4 * hi)) & 0x0303) << 4)
                acc = _gemv_mac_bits(acc, _code_f32(u, b, magic, SOFT), dl, -32.0 * dl, xp, xr,
                                     h * 128 + 64 * hi + j * 16 + 2 * v + b, 0.0, BM)
    return acc


#: Types with a GEMV kernel -> (its step, the (A, B) tile of its per-thread accumulator). Which
#: row counts take it by default, and its launch rules: :mod:`.settings`.
GEMV_STEPS = {
    "Q4_0": (_gemv_q4_0, (8, 2)),
    "Q5_K": (_gemv_q5_k, (8, 4)),
    "Q8_0": (_gemv_q8_0, (16, 2)),
    "Q6_K": (_gemv_q6_k, (8, 2)),
}


@triton.jit
def _gemv_kernel(x, w, y, out, count, n_split, M, N, K, stride_xm, row_bytes, steps_per_split,
                 magic, STEP: tl.constexpr, TS: tl.constexpr, BYTES_PER_STEP: tl.constexpr,
                 F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                 F4: tl.constexpr, BN: tl.constexpr, A: tl.constexpr, B: tl.constexpr,
                 BM: tl.constexpr, OUT: tl.constexpr, PARTIAL: tl.constexpr,
                 FIXUP: tl.constexpr, SOFT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    wrow = (w + tl.minimum(rn, N - 1).to(tl.int64) * row_bytes)[:, None, None]
    xr = _row_offsets(M, stride_xm)
    k_first = pid_k * steps_per_split
    k_last = tl.minimum(k_first + steps_per_split, K // 256)
    z = tl.zeros((BN, A, B), dtype=tl.float32)
    acc = (z, z, z, z)
    for ks in range(k_first, k_last):
        acc = STEP(acc, wrow + ks * BYTES_PER_STEP, x + ks * 256, xr, magic, F0, F1, F2, F3, F4,
                   TS, BM, SOFT)
    _store_rows(acc, y, out, count + pid_n, n_split, pid_k, M, N, rn, BM, OUT, PARTIAL, FIXUP,
                SOFT)
