"""Fused dequantize + matmul for few rows of activations (``y = x @ W.T``, M <= 64).

Memory bound in principle: each weight byte is read once and used in registers, never written
out as a dense weight, so the traffic follows the quantized size (Q4_K is 3.6x smaller than
bf16). In practice the per-element work limits it, so the loop is built to do little per weight:

* Weights are split into chunks that share one scale (a 32- or 16-element (sub-)block): each
  chunk is ``D * u + MB`` with small integer codes ``u``, and its contribution is
  ``D * sum(u * x) + MB * sum(x)`` -- codes times activations, the scale applied once per chunk
  (the arrangement ggml's own dot products use). No weight is rounded on the way: the result is
  the exact-weight product accumulated in float32, not bit-identical to the large-M path
  (decode, round to the activation dtype, cuBLAS), and at least as accurate.
* Codes become floats through their bit patterns, not conversion instructions (see
  :func:`_to_f32` and :func:`_accum`).
* One to :data:`ROW_MAX_M` activation rows (timestep/modulation projections, batch-1 work and
  its CFG pair) can run on the CUDA cores, decoding each weight once for all rows: for the types
  in :data:`ROW_STEPS` in the row kernel, whose warps read whole weight rows with wide contiguous
  loads (the fastest to load by far, see :func:`_rows_kernel`); for the types in
  :data:`GEMV_STEPS` in a GEMV kernel that applies the scale per weight and sums once at the end.
  :data:`CUDA_CORE_ROWS` says for which row counts they are the default (where they measured
  faster). Otherwise one row takes the chunked kernel's one-row branch, and more rows go through
  ``tl.dot`` with the activations padded to a 16/32/64-row tile.
* Each step covers 256 elements of K (one super-block, or eight 32-element blocks), so K must be
  a multiple of 256; K is split across programs to fill the GPU and the float32 partial sums are
  added in a fixed order (deterministic results).

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import torch

from ._decode import _i8, _u8, tl, to_out, triton
from ._dequant import TL_DTYPES, kernel_spec, soft_bf16

__all__ = ["CUDA_CORE_ROWS", "FUSED_TYPES", "FIXUP_TILES", "BK", "ROW_MAX_M", "ROW_STEPS", "RULES",
           "arrival_counters", "block_m", "fused_linear"]

#: K consumed per loop step.
BK = 256


# -- loads -----------------------------------------------------------------------------------------

@triton.jit
def _w32(p):
    """32-bit little-endian words at byte pointers ``p`` (4-byte aligned), as int32."""
    return tl.load(p.to(tl.pointer_type(tl.int32)))


@triton.jit
def _half(p):
    """A float16 at a 2-byte aligned byte pointer, as float32 (exact)."""
    return tl.load(p.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _bits_to_f32(h):
    """The float16 whose bit pattern is the low 16 bits of int32 ``h``, as float32."""
    return (h & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _to_f32(u, magic):
    """Non-negative int32 ``u`` < 2**23 as float32, exactly, without a conversion instruction.

    ``magic | u`` with ``magic`` = 0x4B000000 is the bit pattern of the float32 ``2**23 + u``.
    Integer -> float conversion runs at a quarter of the FMA rate, which bounds a decode-heavy
    loop; ``magic`` is a run-time argument so that LLVM cannot turn the trick back into one.
    """
    return (u | magic).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _byte(word, k: tl.constexpr):
    """Byte ``k`` (0..3) of int32 words, as 0..255."""
    return (word >> (8 * k)) & 255


# -- one chunk of weights: ``D * u + MB`` -------------------------------------------------------------

@triton.jit
def _accum(acc, u, D, MB, xrow, xmask, magic, COL0: tl.constexpr, UMAX: tl.constexpr,
           UOFF: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    """``acc (BN, BM) += W_chunk @ x[:, COL0:COL0+L].T`` for the chunk ``W = D * u + MB``.

    ``u`` (BN, L) holds integer codes in ``0..UMAX``; ``D`` and ``MB`` (BN, 1) are float32. The
    sum is split as ``D * sum(u * x) + MB * sum(x)``: the codes are multiplied as small exact
    integers and the scale is applied once per chunk, which is cheaper than decoding every weight
    and no less exact (no weight is rounded; ggml's own dot products are arranged the same way).
    Codes become floats through their bit patterns (:func:`_to_f32`): ``0x4300 | u`` the
    bfloat16 ``128 + u`` (u < 128), ``0x6400 | u`` the float16 ``1024 + u`` (u < 1024).
    """
    BM: tl.constexpr = xrow.shape[0]
    L: tl.constexpr = u.shape[1]
    cols = COL0 + tl.arange(0, L)[None, :]
    if BM == 1:
        # One activation row: products and sums on the CUDA cores in float32.
        xt = tl.load(xrow[:, None] + cols).to(tl.float32)  # (1, L)
        uf = _to_f32(u, magic)
        s = tl.sum(uf * xt, axis=1)[:, None]
        xs = tl.sum(xt, axis=1)[:, None]
        return acc + D * s + MB * xs
    xt = tl.load(xrow[:, None] + cols, mask=xmask[:, None], other=0.0)  # (BM, L)
    xs = tl.sum(xt.to(tl.float32), axis=1)[None, :]  # (1, BM)
    if SOFT:
        # Triton's interpreter multiplies bfloat16 as raw integers: float32 there (exact).
        a = _to_f32(u, magic)
        r = tl.dot(a, tl.trans(xt.to(tl.float32)), input_precision="ieee")
        return acc + D * r + MB * xs
    if OUT == tl.bfloat16 and UMAX < 128:
        a = (u | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        mb = MB - D * 128.0
    elif OUT == tl.float16 and UMAX < 1024:
        a = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        mb = MB - D * 1024.0
    else:
        # Exact: u + UOFF is a small integer in every 16-bit float format here.
        a = (_to_f32(u, magic) + UOFF).to(OUT)
        mb = MB - D * UOFF
    r = tl.dot(a, tl.trans(xt))  # (BN, BM): sum((u + offset) * x)
    return acc + D * r + mb * xs


# -- one step (256 elements of K) per type -------------------------------------------------------------
# ``wp`` (BN,) byte pointers to this step's first block of each weight row; F0..F4 the fields'
# byte offsets in the registry's layout order (see _dequant.SPECS); TS the block's byte size.

@triton.jit
def _step_q4_0(acc, wp, xrow, xmask, magic, F_D, F_QS, F2, F3, F4, TS: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    # Eight blocks: byte l of block kb holds element kb*32 + l (low nibble) and + 16 (high).
    l = tl.arange(0, 16)[None, :]
    for kb in tl.static_range(8):
        bp = wp[:, None] + kb * TS
        d = _half(bp + F_D)
        q = _u8(bp + F_QS + l)
        for p in tl.static_range(2):
            acc = _accum(acc, (q >> (4 * p)) & 15, d, -8.0 * d, xrow, xmask, magic, kb * 32 + 16 * p,
                         15, 0, OUT, SOFT)
    return acc


@triton.jit
def _step_q8_0(acc, wp, xrow, xmask, magic, F_D, F_QS, F2, F3, F4, TS: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    # Eight blocks of 32 signed bytes; codes u = q + 128 keep them non-negative.
    l = tl.arange(0, 32)[None, :]
    for kb in tl.static_range(8):
        bp = wp[:, None] + kb * TS
        d = _half(bp + F_D)
        u = _i8(bp + F_QS + l) + 128
        acc = _accum(acc, u, d, -128.0 * d, xrow, xmask, magic, kb * 32, 255, -128, OUT, SOFT)
    return acc


@triton.jit
def _k4_head(bp, F_D: tl.constexpr, F_SC: tl.constexpr):
    """Q4_K/Q5_K super-block head: ``d``, ``dmin`` (float32) and the 12 scale bytes as 3 words."""
    head = _w32(bp + F_D)
    return (_bits_to_f32(head), _bits_to_f32(head >> 16), _w32(bp + F_SC), _w32(bp + F_SC + 4),
            _w32(bp + F_SC + 8))


@triton.jit
def _k4_affine(d, dmin, s0, s1, s2, s: tl.constexpr, magic):
    """Sub-block ``s``'s weights as ``D * code + MB``: returns ``(D, MB)`` = (d * scale, -dmin * min).

    The six-bit scale and min are packed in 12 bytes (words ``s0..s2``): s < 4 takes bytes s and
    s+4; s >= 4 takes the nibbles of byte s+4 and the top two bits of bytes s-4 (scale) and s (min).
    """
    if s < 4:
        sc = _byte(s0, s) & 63
        mn = _byte(s1, s) & 63
    else:
        sc = (_byte(s2, s - 4) & 15) | ((_byte(s0, s - 4) >> 6) << 4)
        mn = (_byte(s2, s - 4) >> 4) | ((_byte(s1, s - 4) >> 6) << 4)
    return d * _to_f32(sc, magic), -(dmin * _to_f32(mn, magic))


@triton.jit
def _step_kq45(acc, wp, xrow, xmask, magic, F_D, F_DMIN, F_SC, F_QH, F_QS, HAS_QH: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    # Q4_K / Q5_K: byte l of qs group g holds element g*64 + l (sub-block 2g) in its low nibble
    # and element g*64 + 32 + l (sub-block 2g + 1) in its high nibble; Q5_K's fifth bit of
    # sub-block s is bit s of qh[l].
    tl.static_assert(F_D % 4 == 0 and F_DMIN == F_D + 2 and F_SC % 4 == 0)
    l = tl.arange(0, 32)[None, :]
    bp = wp[:, None]
    d, dmin, s0, s1, s2 = _k4_head(bp, F_D, F_SC)
    if HAS_QH:
        qh = _u8(bp + F_QH + l)
    for g in tl.static_range(4):
        q = _u8(bp + F_QS + g * 32 + l)
        for p in tl.static_range(2):
            s = 2 * g + p
            D, MB = _k4_affine(d, dmin, s0, s1, s2, s, magic)
            u = (q >> (4 * p)) & 15
            if HAS_QH:
                u = u | (((qh >> s) & 1) << 4)
            acc = _accum(acc, u, D, MB, xrow, xmask, magic, g * 64 + 32 * p, 31, 0, OUT, SOFT)
    return acc


@triton.jit
def _step_q4_k(acc, wp, xrow, xmask, magic, F0, F1, F2, F3, F4, TS: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    return _step_kq45(acc, wp, xrow, xmask, magic, F0, F1, F2, 0, F3, False, OUT, SOFT)


@triton.jit
def _step_q5_k(acc, wp, xrow, xmask, magic, F0, F1, F2, F3, F4, TS: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    return _step_kq45(acc, wp, xrow, xmask, magic, F0, F1, F2, F3, F4, True, OUT, SOFT)


@triton.jit
def _step_q6_k(acc, wp, xrow, xmask, magic, F_QL, F_QH, F_SC, F_D, F4, TS: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    # Half h, quarter j: ql[h*64 + j*16 + l] holds element h*128 + j*16 + l (sub-block h*8 + j)
    # in its low nibble and element + 64 (sub-block h*8 + 4 + j) in its high nibble; their top
    # two bits are pair j>>1 resp. 2 + (j>>1) of qh[h*32 + (j&1)*16 + l]. Codes are 6-bit, the
    # weight sc * d * (u - 32).
    l = tl.arange(0, 16)[None, :]
    bp = wp[:, None]
    d = _half(bp + F_D)
    for h in tl.static_range(2):
        for j in tl.static_range(4):
            ql = _u8(bp + F_QL + h * 64 + j * 16 + l)
            qh = _u8(bp + F_QH + h * 32 + (j & 1) * 16 + l)
            for p in tl.static_range(2):
                s = h * 8 + 4 * p + j
                sc = _i8(bp + F_SC + s).to(tl.float32)
                u = ((ql >> (4 * p)) & 15) | (((qh >> (2 * (j >> 1) + 4 * p)) & 3) << 4)
                dl = d * sc
                acc = _accum(acc, u, dl, -32.0 * dl, xrow, xmask, magic, h * 128 + 64 * p + j * 16,
                             63, 0, OUT, SOFT)
    return acc


# -- one activation row: the GEMV kernel ------------------------------------------------------------
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


#: Types with a GEMV kernel -> (its step, the (A, B) tile of its per-thread accumulator, launch
#: rule for one row). Which row counts take it by default: :data:`CUDA_CORE_ROWS`. Against the
#: chunked kernel's one-row branch (H100, CUDA-graph timings, Wan-14B shapes) it ran Q6_K
#: 1.7-2.3x, Q8_0 ~1.1x and Q5_K ~1.05x faster, and Q4_0 0.9-1.0x (kept for two rows).
GEMV_STEPS = {
    "Q4_0": (_gemv_q4_0, (8, 2), (64, 8, 4, 1)),
    "Q5_K": (_gemv_q5_k, (8, 4), (64, 8, 4, 1)),
    "Q8_0": (_gemv_q8_0, (16, 2), (64, 8, 4, 1)),
    "Q6_K": (_gemv_q6_k, (8, 2), (32, 8, 4, 1)),
}


# -- one activation row, weight rows read whole: the row kernel ------------------------------------
# Each warp takes whole weight rows, its 32 threads J = 4 consecutive super-blocks x 8 parts each,
# so one warp-wide 16-byte load reads ~512 contiguous bytes of a row. The other kernels read a
# small piece of many rows at a time; on an H100 that alone (no arithmetic at all) loaded Q4_K
# 5120x5120 in 16-17 us against 13.8 us this way and 12 us for a plain contiguous read
# (benchmarks/gpu_results_h100.md). Codes become the float32 ``1 + u/128`` by their bit patterns:
# one shift and one and-or per code, no subtraction, and ``sum((1 + u/128) x) - sum(x)`` is
# ``sum(u x) / 128`` (each product is exact; the sums round in float32 as in the other kernels).
# Given up to four activation rows (BM = 2 or 4), each step decodes once and runs the products
# per row, so each row's sums are those of the one-row kernel.

@triton.jit
def _words4(v):
    """The four int32 words along ``v``'s last (in-thread, size-4) dimension, as four tensors."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], v.shape[2], 2, 2)))
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def _codes_1p(q0, q1, e, HI: tl.constexpr, one):
    """Float32 ``1 + u/128`` for the codes of two words: element ``e`` (0..7) takes nibble ``HI``
    of byte ``e % 4`` of ``q0`` (e < 4) or ``q1``, moved to mantissa bits 16..19 by one shift.

    ``one`` = 0x3F800000 (the float 1.0) is a run-time argument so the and-or stays one LOP3.
    """
    q = tl.where(e < 4, q0, q1)
    src = 8 * (e & 3) + 4 * HI
    moved = tl.where(src <= 16, q << tl.maximum(16 - src, 0), q >> tl.maximum(src - 16, 0))
    return ((moved & 0x000F0000) | one).to(tl.float32, bitcast=True)


@triton.jit
def _rows_dot(acc, c_lo0, c_lo1, c_hi0, c_hi1, d_lo, d_hi, m_lo, m_hi, xp, xok):
    """One activation row's share of a Q4_K step: ``acc`` (R, J, 8) += the part's 32 products.

    ``c_*`` are the part's codes as float32 ``1 + u/128`` (R, J, 8, 8) -- low / high nibbles,
    first / second 8 elements -- and ``d_*``, ``m_*`` (R, J, 8) its two sub-blocks' scales
    (times 128) and mins; ``xp`` (R, J, 8, 8) points at x[64g + 16(p % 2) + 0..7] of this row.
    """
    x00 = tl.load(xp, mask=xok, other=0.0).to(tl.float32)
    x01 = tl.load(xp + 8, mask=xok, other=0.0).to(tl.float32)
    x10 = tl.load(xp + 32, mask=xok, other=0.0).to(tl.float32)
    x11 = tl.load(xp + 40, mask=xok, other=0.0).to(tl.float32)
    s_lo = tl.sum(c_lo0 * x00 + c_lo1 * x01, axis=3)
    s_hi = tl.sum(c_hi0 * x10 + c_hi1 * x11, axis=3)
    x_lo = tl.sum(x00 + x01, axis=3)
    x_hi = tl.sum(x10 + x11, axis=3)
    # weight = d_lo/128 * u - m_lo, so sum(w x) = d_lo * (s_lo - x_lo) - m_lo * x_lo
    return acc + d_lo * s_lo - (d_lo + m_lo) * x_lo + d_hi * s_hi - (d_hi + m_hi) * x_hi


@triton.jit
def _rows_q4_k(acc, base, xp, xr, ok, one, BM: tl.constexpr, F_D: tl.constexpr,
               F_DMIN: tl.constexpr, F_SC: tl.constexpr, F_QS: tl.constexpr, F4: tl.constexpr):
    # ``base`` (R, J, 1, 1): int32 pointers to J super-blocks of R rows; thread (j, p) reads qs
    # bytes 16p..16p+15 -- group g = p // 2, words 4(p % 2)..+3: elements 64g + 16(p % 2) + 4t + b
    # in the low nibbles (sub-block 2g), + 32 in the high ones (2g + 1) -- and its block's 16-byte
    # head (d | dmin << 16, then the 12 scale bytes), the same address for the 8 parts (one
    # broadcast). ``xp`` (R, J, 8, 8) points at x[64g + 16(p % 2) + 0..7] of the part's block in
    # activation row 0; row i of 1..BM-1 is ``xr[i - 1]`` elements further (``acc`` holds one tile
    # per row, as in the GEMV kernel). The weight is decoded once for all BM rows.
    tl.static_assert(F_D == 0 and F_DMIN == 2 and F_SC == 4 and F_QS == 16)
    p = tl.arange(0, 8)[None, None, :]
    g = p // 2
    w4 = tl.arange(0, 4)[None, None, None, :]
    e = tl.arange(0, 8)[None, None, None, :]
    # The weight is read once: "evict_first" keeps it from pushing the activations out of the
    # caches (H100: 5120x13824 33.1 -> 30.7 us, 13824x5120 32.8 -> 32.3, 5120x5120 unchanged).
    q = tl.load(base + (F_QS // 4) + p[:, :, :, None] * 4 + w4, mask=ok, other=0,
                eviction_policy="evict_first")  # (R, J, 8, 4)
    head = tl.load(base + w4 + 0 * p[:, :, :, None], mask=ok, other=0,
                   eviction_policy="evict_first")
    hd, s0, s1, s2 = _words4(head)
    q0, q1, q2, q3 = _words4(q)
    xok = ok & (e >= 0)
    u0 = q0[:, :, :, None]
    u1 = q1[:, :, :, None]
    u2 = q2[:, :, :, None]
    u3 = q3[:, :, :, None]
    c_lo0 = _codes_1p(u0, u1, e, 0, one)
    c_lo1 = _codes_1p(u2, u3, e, 0, one)
    c_hi0 = _codes_1p(u0, u1, e, 1, one)
    c_hi1 = _codes_1p(u2, u3, e, 1, one)
    d = _bits_to_f32(hd)
    dmin = _bits_to_f32(hd >> 16)
    # The eight 6-bit scales and mins packed four to a word (bytes 0..3: sub-blocks 0..3 or
    # 4..7), then this part's two: bytes 2(g % 2) and 2(g % 2) + 1 of the lower or upper word.
    sc_w = tl.where(g < 2, s0 & 0x3F3F3F3F, (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030))
    mn_w = tl.where(g < 2, s1 & 0x3F3F3F3F, ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030))
    sh = 16 * (g & 1)
    d_lo = d * ((sc_w >> sh) & 63).to(tl.float32) * 128.0
    d_hi = d * ((sc_w >> (sh + 8)) & 63).to(tl.float32) * 128.0
    m_lo = dmin * ((mn_w >> sh) & 63).to(tl.float32)
    m_hi = dmin * ((mn_w >> (sh + 8)) & 63).to(tl.float32)
    a0 = _rows_dot(acc[0], c_lo0, c_lo1, c_hi0, c_hi1, d_lo, d_hi, m_lo, m_hi, xp, xok)
    a1 = acc[1]
    a2 = acc[2]
    a3 = acc[3]
    if BM > 1:
        a1 = _rows_dot(a1, c_lo0, c_lo1, c_hi0, c_hi1, d_lo, d_hi, m_lo, m_hi, xp + xr[0], xok)
    if BM > 2:
        a2 = _rows_dot(a2, c_lo0, c_lo1, c_hi0, c_hi1, d_lo, d_hi, m_lo, m_hi, xp + xr[1], xok)
        a3 = _rows_dot(a3, c_lo0, c_lo1, c_hi0, c_hi1, d_lo, d_hi, m_lo, m_hi, xp + xr[2], xok)
    return a0, a1, a2, a3


@triton.jit
def _rows_kernel(x, w, y, out, count, n_split, M, N, K, stride_xm, row_bytes, steps_per_split,
                 one, STEP: tl.constexpr, TS: tl.constexpr, F0: tl.constexpr, F1: tl.constexpr,
                 F2: tl.constexpr, F3: tl.constexpr, F4: tl.constexpr, R: tl.constexpr,
                 J: tl.constexpr, BM: tl.constexpr, OUT: tl.constexpr, PARTIAL: tl.constexpr,
                 FIXUP: tl.constexpr, SOFT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * R + tl.arange(0, R)
    rows = (w + tl.minimum(rn, N - 1).to(tl.int64) * row_bytes).to(tl.pointer_type(tl.int32))
    rows = rows[:, None, None, None]
    jv = tl.arange(0, J)[None, :, None, None]
    p = tl.arange(0, 8)[None, None, :, None]
    # x offsets of each part's first activation, full (R, J, 8, 8) shape so that the loads are
    # 16 bytes wide (a (1, J, 8, 8) tensor has too few elements to give each thread 8).
    e = tl.arange(0, 8)[None, None, None, :]
    xoff = 64 * (p // 2) + 16 * (p % 2) + e + 0 * rn[:, None, None, None]
    xr = _row_offsets(M, stride_xm)
    k_first = pid_k * steps_per_split
    k_last = tl.minimum(k_first + steps_per_split, K // 256)
    # Whole steps without masks (masked loads cost a zeroing and a predicate each: peeling the
    # ragged last step off measured 2-8% faster), then the ragged step, if any, with them.
    k_full = k_first + (k_last - k_first) // J * J
    z = tl.zeros((R, J, 8), dtype=tl.float32)
    acc = (z, z, z, z)
    for j0 in range(k_first, k_full, J):
        sb = j0 + jv
        acc = STEP(acc, rows + sb * (TS // 4), x + sb * 256 + xoff, xr, True, one, BM,
                   F0, F1, F2, F3, F4)
    for j0 in range(k_full, k_last, J):
        sb = j0 + jv
        acc = STEP(acc, rows + sb * (TS // 4), x + sb * 256 + xoff, xr, sb < k_last, one, BM,
                   F0, F1, F2, F3, F4)
    _store_rows(acc, y, out, count + pid_n, n_split, pid_k, M, N, rn, BM, OUT, PARTIAL, FIXUP,
                SOFT)


#: Types whose one-row calls take the row kernel -> (its step, launch rule (rows per program,
#: waves, num_warps, num_stages)). Measured on an H100 (CUDA graphs, Wan-14B shapes 5120x5120 /
#: 5120x13824 / 13824x5120): Q4_K 16.3 / 30.8 / 32.4 us against the chunked kernel's 20.8 / 39.9
#: / 41.2 us (bf16: 30.3 / 64.5 / 66.3 us); one row per warp was the best of 1-4 rows per warp,
#: 1-8 warps, 2-8 super-blocks per warp step and K splits of 1-4 (those shapes need none: 1280+
#: programs; split in two they ran 3-30% slower), and loading the next step before using this
#: one ran 5-20% slower.
ROW_STEPS = {
    "Q4_K": (_rows_q4_k, (4, 2, 4, 1)),
}

#: Super-blocks per warp step in the row kernel (J): 4 x 8 parts = the 32 threads of a warp.
ROW_J = 4

#: Activation rows the row and GEMV kernels take in one pass (each weight decoded once for all).
ROW_MAX_M = 4

#: Row counts that take the row / GEMV kernel by default, per type -> (fewest rows, most rows,
#: launch rule for 2+ rows); other counts take the chunked kernel (one row) or the tensor cores.
#: Measured on an H100 (CUDA graphs, Wan-14B shapes 5120x5120 / 5120x13824 / 13824x5120,
#: ``benchmarks/gpu_linear.py --one-row --one-row-ms 1 2 4``), against the tensor-core path:
#: Q4_K 2 rows 20.7 / 40.1 / 42.7 us vs 27.5 / 49.4 / 48.2 (4 rows: 30.5 / 67.1 / 69.4 vs 27.6 /
#: 49.6 / 48.8, so 3-4 rows stay on tensor cores); Q8_0 2 rows 35.2 / 70.0 / 70.6 vs 55.6 / 112 /
#: 111, 4 rows 50.0 / 97.5 / 113 vs 56.0 / 115 / 112; Q6_K 2 rows 28.8 / 53.9 / 55.4 vs 59.2 /
#: 116 / 119, 4 rows 34.1 / 64.0 / 65.5 vs 59.4 / 116 / 119; Q4_0 2 rows 27.3 / 62.8 / 55.0 vs
#: 41.0 / 85.5 / 85.3 (4 rows: 44.4 / 89.2 / 91.2 vs 41.3 / 86.6 / 86.3; one row: 23.1 / 49.7 /
#: 46.5 vs the chunked kernel's 22.1 / 42.3 / 45.2). Q5_K lost at 2 rows (30.9 / 60.3 / 63.2 vs
#: 30.4 / 57.2 / 55.9). Three rows take the 4-row kernels.
CUDA_CORE_ROWS = {
    "Q4_K": (1, 2, (4, 2, 4, 1)),
    "Q8_0": (1, 4, (32, 8, 4, 1)),
    "Q6_K": (1, 4, (64, 8, 4, 1)),
    "Q5_K": (1, 1, None),
    "Q4_0": (2, 2, (32, 8, 4, 1)),
}


@triton.jit
def _finish_split(part, out, count, n_split, plane, offs, mask, OUT: tl.constexpr,
                  SOFT: tl.constexpr):
    """After this program stored its float32 partial sums: the last of a tile's K splits adds them.

    ``part`` is the (n_split, M, N) partial buffer, ``plane`` = M * N, ``offs`` the tile's
    element offsets in one plane, ``count`` its arrival counter (zero before the call, zero again
    after). The partials are added in split order whatever order the programs finish in, so the
    result is bit for bit the one :func:`_reduce_kernel` gives -- without a second launch.
    """
    # Every thread's stores are issued before one thread counts the arrival with release
    # semantics; the last arrival acquires, and the barrier inside the scalar atomic orders the
    # other threads' loads after it. ".cg" reads from L2, where the other programs' sums are.
    tl.debug_barrier()
    arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
    if arrived == n_split - 1:
        total = tl.load(part + offs, mask=mask, other=0.0, cache_modifier=".cg")
        for i in range(1, n_split):
            total += tl.load(part + i * plane + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out + offs, to_out(total, OUT, SOFT), mask=mask)
        tl.atomic_xchg(count, 0)  # ready for the slot's next use


@triton.jit
def _row_offsets(M, stride_xm):
    """Element offsets of activation rows 1, 2, 3 from row 0 for the few-row kernels; rows past
    M re-read row M - 1 (in bounds; their outputs are not stored)."""
    return (tl.minimum(1, M - 1).to(tl.int64) * stride_xm,
            tl.minimum(2, M - 1).to(tl.int64) * stride_xm,
            tl.minimum(3, M - 1).to(tl.int64) * stride_xm)


@triton.jit
def _put_row(acc, y, i: tl.constexpr, M, N, pid_k, rn, OUT: tl.constexpr, PARTIAL: tl.constexpr,
             SOFT: tl.constexpr):
    """Activation row ``i``: sum each thread's tile ``acc`` into outputs ``rn`` and store them
    (rows past M are dropped) -- or, with K split, this split's float32 partial sums."""
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    ok = (rn < N) & (i < M)
    if not PARTIAL:
        tl.store(y + i * N + rn, to_out(total, OUT, SOFT), mask=ok)
    else:
        tl.store(y + (pid_k * M + i).to(tl.int64) * N + rn, total, mask=ok)


@triton.jit
def _store_rows(acc, y, out, count, n_split, pid_k, M, N, rn, BM: tl.constexpr,
                OUT: tl.constexpr, PARTIAL: tl.constexpr, FIXUP: tl.constexpr,
                SOFT: tl.constexpr):
    """End of a one-row / few-row kernel: activation rows 0..BM-1 from the per-thread tiles
    ``acc[0..3]`` (see :func:`_put_row`); with K split, the tile's last split adds the partial
    sums where FIXUP (``count`` its arrival counter)."""
    _put_row(acc[0], y, 0, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
    if BM > 1:
        _put_row(acc[1], y, 1, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
    if BM > 2:
        _put_row(acc[2], y, 2, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
        _put_row(acc[3], y, 3, M, N, pid_k, rn, OUT, PARTIAL, SOFT)
    if PARTIAL and FIXUP:
        m = tl.arange(0, BM)[:, None]
        _finish_split(y, out, count, n_split, M * N, m * N + rn[None, :],
                      (m < M) & (rn < N)[None, :], OUT, SOFT)


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


#: Types with a fused kernel -> their step function (each step consumes BK=256 of K).
FUSED_TYPES = {
    "Q4_0": _step_q4_0,
    "Q8_0": _step_q8_0,
    "Q4_K": _step_q4_k,
    "Q5_K": _step_q5_k,
    "Q6_K": _step_q6_k,
}


@triton.jit
def _fused_kernel(x, w, y, out, count, n_split, M, N, K, stride_xm, stride_ym, row_bytes,
                  steps_per_split, magic,
                  STEP: tl.constexpr, TS: tl.constexpr, BYTES_PER_STEP: tl.constexpr,
                  F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                  F4: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, OUT: tl.constexpr,
                  PARTIAL: tl.constexpr, FIXUP: tl.constexpr, SOFT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    # Rows past N re-read row N-1 (in bounds); their results are masked at the store.
    wrow = w + tl.minimum(rn, N - 1).to(tl.int64) * row_bytes
    xrow = x + rm.to(tl.int64) * stride_xm
    xmask = rm < M
    k_first = pid_k * steps_per_split
    k_last = tl.minimum(k_first + steps_per_split, K // 256)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for ks in range(k_first, k_last):
        acc = STEP(acc, wrow + ks * BYTES_PER_STEP, xrow + ks * 256, xmask, magic,
                   F0, F1, F2, F3, F4, TS, OUT, SOFT)
    out_mask = (rn < N)[:, None] & (rm < M)[None, :]
    if not PARTIAL:
        ptrs = y + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(ptrs, to_out(acc, OUT, SOFT), mask=out_mask)
    else:
        # float32 partial sums (SPLIT, M, N), added in a fixed order by the tile's last program
        # (FIXUP) or by _reduce_kernel.
        offs = rm.to(tl.int64)[None, :] * N + rn[:, None]
        tl.store(y + pid_k.to(tl.int64) * M * N + offs, acc, mask=out_mask)
        if FIXUP:
            _finish_split(y, out, count + pid_n, n_split, M * N, offs, out_mask, OUT, SOFT)


@triton.jit
def _reduce_kernel(part, out, total, SPLIT: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr,
                   BLOCK: tl.constexpr):
    """``out = sum(part[0..SPLIT))`` in a fixed order (deterministic), rounded once to ``OUT``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(part + offs, mask=mask, other=0.0)
    for i in tl.static_range(1, SPLIT):
        acc += tl.load(part + i * total + offs, mask=mask, other=0.0)
    tl.store(out + offs, to_out(acc, OUT, SOFT), mask=mask)


#: Launch rule per activation-tile height BM: (BN, waves, num_warps, num_stages). ``waves`` is how
#: many programs per SM the K dimension is split to reach. Chosen by sweeping BN in 32..256,
#: waves in 1..16, 1..8 warps and 1..4 stages for Q4_K (and a subset for the other types) on the
#: Wan-14B shapes on an H100 (geometric mean over the shapes); ``benchmarks/gpu_linear.py --tune``
#: repeats such a sweep.
RULES: dict[int, tuple[int, int, int, int]] = {
    1: (32, 8, 4, 1), 16: (64, 8, 4, 3), 32: (128, 4, 4, 3), 64: (128, 4, 4, 3)}


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_m(m: int) -> int:
    """The activation tile height for ``m`` rows (1: the CUDA-core path)."""
    return 1 if m == 1 else 16 if m <= 16 else (32 if m <= 32 else 64)


def split_for(m: int, n: int, k: int, bn: int, waves: int, device: torch.device) -> int:
    """K split (a power of two, at most 32) giving at least ``waves`` programs per SM."""
    programs = triton.cdiv(n, bn)
    steps = k // BK
    split = 1
    while programs * split < waves * _sm_count(device) and split * 2 <= steps and split < 32:
        split *= 2
    return split


#: Where the K-split partial sums are added by the last program of each tile (no second launch):
#: type -> activation tile heights. Measured on an H100 (CUDA graphs, Wan-14B shapes): at tile 16
#: it took Q4_K from 32.2/62.4/63.8 us to 28.9/52.1/50.4 us and Q5_K ~1 us lower; at one row,
#: at tiles 32/64 and for the other types it was level or up to 20% slower (the last program's
#: extra latency outweighs the launch it saves).
FIXUP_TILES: dict[str, tuple[int, ...]] = {"Q4_K": (16,), "Q5_K": (16,)}

#: Arrival-counter slots per device (int32, 1 MiB), handed out round-robin by
#: :func:`arrival_counters`.
COUNTER_RING = 1 << 18
_RINGS: dict[torch.device, list] = {}  # device -> [zeroed int32 ring, next free slot]
_RINGS_LOCK = threading.Lock()  # calls from several threads never share slots


def arrival_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """``n`` zeroed int32 arrival counters for one split-K call, or ``None`` where there are none.

    The slots come round-robin from one zero-initialised ring per device. A call's programs count
    their arrivals per column tile and the last one resets its counter, so slots are zero again
    when the call ends and are reused without clearing; the next call takes the next slots. Calls
    on one stream run one after another; calls on different streams (or CUDA graphs replayed on
    different streams) could only meet on a slot if they ran at the same time while
    :data:`COUNTER_RING` slots apart. Returns ``None`` -- the caller then adds the partial sums with
    a second kernel -- when ``n`` exceeds the ring, or when the ring does not exist yet during a
    CUDA-graph capture (allocating there would tie it to the graph's memory pool).
    """
    if n > COUNTER_RING:
        return None
    with _RINGS_LOCK:
        ring = _RINGS.get(device)
        if ring is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            ring = _RINGS[device] = [torch.zeros(COUNTER_RING, dtype=torch.int32, device=device), 0]
        buf, first = ring
        if first + n > COUNTER_RING:
            first = 0
        ring[1] = first + n
    return buf[first:first + n]


def fused_linear(x2d: torch.Tensor, raw: torch.Tensor, name: str, n: int, *,
                 rule: tuple[int, int, int, int] | None = None,
                 gemv: bool | None = None, fixup: bool | None = None) -> torch.Tensor:
    """``x2d (M, K) @ W.T`` for ``W`` the ``(n, K)`` weight of type ``name`` in ``raw`` (n, row_bytes).

    ``x2d`` is float16 or bfloat16 with unit stride along K, M <= 64; ``K`` a multiple of 256.
    The output is ``(M, n)`` of ``x2d``'s dtype. ``rule`` = (BN, waves, num_warps, num_stages)
    overrides :data:`RULES` (the benchmarks tune with it). ``gemv`` picks the CUDA-core kernel
    (``None``: the measured choice, :data:`CUDA_CORE_ROWS` -- the row kernel for
    :data:`ROW_STEPS`, the GEMV kernel for :data:`GEMV_STEPS`, decoding each weight once for all
    rows; ``True``: those kernels for any 1..:data:`ROW_MAX_M` rows; ``False``: the chunked /
    tensor-core kernel). For the row kernel ``rule`` is (weight rows per program, waves,
    num_warps, num_stages).

    When K is split across programs, the float32 partial sums are added either by the last
    program of each column tile (``fixup=True``; :func:`arrival_counters`) or by a second kernel
    (``fixup=False``), in the same order, so the results are the same bits. ``None`` takes the
    measured choice, :data:`FIXUP_TILES` (falling back to the second kernel when a CUDA-graph
    capture finds no counters yet).
    """
    spec = kernel_spec(name)
    m, k = x2d.shape
    if raw.data_ptr() % 16:
        raw = raw.clone()  # the steps read 2- and 4-byte units; a fresh allocation is aligned
    bm = block_m(m)
    has_cuda_core = name in ROW_STEPS or name in GEMV_STEPS
    fewest, most, few_rule = CUDA_CORE_ROWS.get(name, (0, 0, None))
    if gemv is None:
        gemv = fewest <= m <= most
    if gemv and not (has_cuda_core and m <= ROW_MAX_M):
        raise ValueError(f"fused_linear({name}): the GEMV kernel takes up to {ROW_MAX_M} rows of "
                         f"a type in {sorted(GEMV_STEPS.keys() | ROW_STEPS.keys())}, got {m} rows")
    if gemv and m > 1 and few_rule is not None:
        default = few_rule
    elif gemv and name in ROW_STEPS:
        default = ROW_STEPS[name][1]
    elif gemv:
        default = GEMV_STEPS[name][2]
    else:
        default = RULES[bm]
    bn, waves, num_warps, num_stages = rule or default
    split = split_for(m, n, k, bn, waves, x2d.device)
    steps = k // BK
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    out_dtype = TL_DTYPES[x2d.dtype]
    grid = (triton.cdiv(n, bn), split)
    if split == 1:
        y = out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        count = None
    else:
        y = torch.empty((split, m, n), dtype=torch.float32, device=x2d.device)
        out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
        use = bm in FIXUP_TILES.get(name, ()) if fixup is None else fixup
        count = arrival_counters(x2d.device, grid[0]) if use else None
        if fixup and count is None:
            raise RuntimeError(f"fused_linear: fixup=True but no arrival counters for {grid[0]} "
                               f"column tiles (more than COUNTER_RING={COUNTER_RING}, or the "
                               "device's first split-K call made during a CUDA-graph capture)")
    f0, f1, f2, f3, f4 = spec.offsets
    common = dict(TS=spec.type_size, F0=f0, F1=f1, F2=f2, F3=f3, F4=f4, OUT=out_dtype,
                  PARTIAL=split > 1, FIXUP=count is not None, SOFT=soft_bf16(),
                  num_warps=num_warps, num_stages=num_stages)
    # Without counters the dummies are never touched (FIXUP is off).
    cnt = count if count is not None else y
    rows_bm = 1 if m == 1 else 2 if m == 2 else 4  # the CUDA-core kernels' activation rows
    if gemv and name in ROW_STEPS:
        _rows_kernel[grid](x2d, raw, y, out, cnt, split, m, n, k, x2d.stride(0), raw.stride(0),
                           per_split, 0x3F800000, STEP=ROW_STEPS[name][0], R=bn, J=ROW_J,
                           BM=rows_bm, **common)
        return _add_partials(y, out, m * n, split, count, out_dtype)
    common.update(BYTES_PER_STEP=BK // spec.block_size * spec.type_size, BN=bn)
    if gemv:
        step, (ta, tb), _ = GEMV_STEPS[name]
        _gemv_kernel[grid](x2d, raw, y, out, cnt, split, m, n, k, x2d.stride(0), raw.stride(0),
                           per_split, 0x4B000000, STEP=step, A=ta, B=tb, BM=rows_bm, **common)
    else:
        _fused_kernel[grid](x2d, raw, y, out, cnt, split, m, n, k, x2d.stride(0), y.stride(-2),
                            raw.stride(0), per_split, 0x4B000000, STEP=FUSED_TYPES[name], BM=bm,
                            **common)
    return _add_partials(y, out, m * n, split, count, out_dtype)


def _add_partials(y: torch.Tensor, out: torch.Tensor, total: int, split: int,
                  count: torch.Tensor | None, out_dtype) -> torch.Tensor:
    """``out``, once a second kernel has added the K-split partials (if the first did not)."""
    if split > 1 and count is None:
        _reduce_kernel[(triton.cdiv(total, 1024),)](y, out, total, SPLIT=split, OUT=out_dtype,
                                                    SOFT=soft_bf16(), BLOCK=1024, num_warps=4)
    return out
