"""The row kernel: one to four activation rows on the CUDA cores, warps reading whole weight rows.

Dispatch (which types and row counts take it): :mod:`._matmul` and :mod:`.settings`.

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

from ._decode import tl, triton
from ._fused_common import _bits_to_f32, _row_offsets, _store_rows

__all__ = ["ROW_J", "ROW_MAX_M", "ROW_STEPS"]


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


#: Types with a row kernel -> its step. Which row counts take it by default, its launch rules
#: and their measurements: :mod:`.settings`.
ROW_STEPS = {
    "Q4_K": _rows_q4_k,
}

#: Super-blocks per warp step in the row kernel (J): 4 x 8 parts = the 32 threads of a warp.
ROW_J = 4

#: Activation rows the row and GEMV kernels take in one pass (each weight decoded once for all).
ROW_MAX_M = 4
