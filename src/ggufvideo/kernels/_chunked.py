"""The chunked fused kernel: ``y = x @ W.T`` for 1..64 activation rows, one scale chunk at a time.

Weights are split into chunks that share one scale (a 32- or 16-element (sub-)block): each chunk
is ``D * u + MB`` with small integer codes ``u``, and its contribution is
``D * sum(u * x) + MB * sum(x)`` (see :func:`_accum`). One activation row runs on the CUDA cores
(float32 products); more rows go through ``tl.dot`` with the activations padded to a 16/32/64-row
tile (the tensor-core path). Dispatch: :mod:`._matmul`.

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

from ._decode import _i8, _u8, tl, to_out, triton
from ._fused_common import _finish_split, _half, _k4_affine, _k4_head, _to_f32

__all__ = ["FUSED_TYPES"]


# -- one chunk of weights: ``D * u + MB`` ----------------------------------------------------------

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


# -- one step (256 elements of K) per type ---------------------------------------------------------
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
            acc = _accum(acc, (q >> (4 * p)) & 15, d, -8.0 * d, xrow, xmask, magic,
                         kb * 32 + 16 * p, 15, 0, OUT, SOFT)
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
