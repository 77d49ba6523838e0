"""Fused dequantize + matmul for few rows of activations (``y = x @ W.T``, M <= 64).

Memory bound: each weight byte is read once and decoded in registers, so the time follows the
quantized size (Q4_K reads 3.6x fewer bytes than bf16). Every weight is decoded exactly (float32,
ggml's order, no FMA contraction) and rounded once to the activation dtype, so the result is
``x @ dequantize(W, x.dtype).T`` accumulated in float32 -- the large-M path's numbers up to the
order of the accumulation.

Decoding follows *storage* order instead of element order: a byte holding two nibbles yields two
weight tiles (low and high nibbles), each multiplied by the activation columns that belong to it.
A dot product does not care about the order of its terms, so nothing has to be interleaved.

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ._decode import _f16, _i8, _parts_q6_k, _scale_min_k4, _u8, tl, to_out, triton
from ._dequant import TL_DTYPES, kernel_spec, soft_bf16

__all__ = ["FUSED_TYPES", "BK", "fused_linear"]

#: K consumed per loop step (one 256-element super-block, or eight 32-element blocks).
BK = 256


@triton.jit
def _dot_part(acc, w, xrow, xmask, cols, OUT: tl.constexpr, SOFT: tl.constexpr):
    """``acc (BN, BM) += w (BN, P) @ x[:, cols].T`` with ``w`` rounded once to ``OUT``.

    ``cols`` keeps its natural shape ``(1, ..., run)`` (last dimension a contiguous run of
    columns) so that the activation loads stay wide; the tile is flattened after loading.
    """
    xp = xrow
    xm = xmask
    for _ in tl.static_range(len(cols.shape) - 2):
        xp = tl.expand_dims(xp, len(xp.shape))
        xm = tl.expand_dims(xm, len(xm.shape))
    xt = tl.load(xp + cols, mask=xm, other=0.0)
    xt = tl.reshape(xt, (xrow.shape[0], w.shape[1]))  # (BM, P)
    if SOFT and OUT == tl.bfloat16:
        # Triton's interpreter multiplies bfloat16 as raw integers: do the same products in
        # float32 there (every bfloat16 product is exact in float32).
        wf = to_out(w, OUT, SOFT).to(tl.float32)
        return tl.dot(wf, tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(to_out(w, OUT, SOFT), tl.trans(xt), acc)


@triton.jit
def _step_q4_0(acc, bp, xrow, xmask, F0, F1, F2, F3, F4,
               TS: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    # Eight 18-byte blocks per row: (BN, 8, 16) bytes; low nibble = element kb*32 + l, high +16.
    kb = tl.arange(0, 8)[None, :, None]
    l = tl.arange(0, 16)[None, None, :]
    p = bp + kb * TS
    d = _f16(p + F0)
    q = _u8(p + F1 + l)
    BN: tl.constexpr = bp.shape[0]
    lo = tl.reshape(((q & 15) - 8).to(tl.float32) * d, (BN, 128))
    hi = tl.reshape(((q >> 4) - 8).to(tl.float32) * d, (BN, 128))
    c = kb * 32 + l
    acc = _dot_part(acc, lo, xrow, xmask, c, OUT, SOFT)
    return _dot_part(acc, hi, xrow, xmask, c + 16, OUT, SOFT)


@triton.jit
def _step_q8_0(acc, bp, xrow, xmask, F0, F1, F2, F3, F4,
               TS: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    kb = tl.arange(0, 8)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    p = bp + kb * TS
    w = _i8(p + F1 + l).to(tl.float32) * _f16(p + F0)
    BN: tl.constexpr = bp.shape[0]
    return _dot_part(acc, tl.reshape(w, (BN, 256)), xrow, xmask, kb * 32 + l, OUT, SOFT)


@triton.jit
def _step_kq45(acc, bp, xrow, xmask, F_D, F_DMIN, F_SC, F_QH, F_QS, HAS_QH: tl.constexpr,
               OUT: tl.constexpr, SOFT: tl.constexpr):
    # Q4_K / Q5_K: qs as (BN, 4, 32); the low nibble of qs[g*32 + l] is element g*64 + l
    # (sub-block 2g), the high nibble element g*64 + 32 + l (sub-block 2g + 1).
    g = tl.arange(0, 4)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    d = _f16(bp + F_D)
    dmin = _f16(bp + F_DMIN)
    sc0, mn0 = _scale_min_k4(bp, F_SC, 2 * g)
    sc1, mn1 = _scale_min_k4(bp, F_SC, 2 * g + 1)
    q = _u8(bp + F_QS + g * 32 + l)
    q0 = q & 15
    q1 = q >> 4
    if HAS_QH:
        h = _u8(bp + F_QH + l)
        q0 = q0 | (((h >> (2 * g)) & 1) << 4)
        q1 = q1 | (((h >> (2 * g + 1)) & 1) << 4)
    BN: tl.constexpr = bp.shape[0]
    w0 = tl.reshape((d * sc0.to(tl.float32)) * q0.to(tl.float32) - dmin * mn0.to(tl.float32),
                    (BN, 128))
    w1 = tl.reshape((d * sc1.to(tl.float32)) * q1.to(tl.float32) - dmin * mn1.to(tl.float32),
                    (BN, 128))
    c = g * 64 + l
    acc = _dot_part(acc, w0, xrow, xmask, c, OUT, SOFT)
    return _dot_part(acc, w1, xrow, xmask, c + 32, OUT, SOFT)


@triton.jit
def _step_q4_k(acc, bp, xrow, xmask, F0, F1, F2, F3, F4,
               TS: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    return _step_kq45(acc, bp, xrow, xmask, F0, F1, F2, 0, F3, False, OUT, SOFT)


@triton.jit
def _step_q5_k(acc, bp, xrow, xmask, F0, F1, F2, F3, F4,
               TS: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    return _step_kq45(acc, bp, xrow, xmask, F0, F1, F2, F3, F4, True, OUT, SOFT)


@triton.jit
def _step_q6_k(acc, bp, xrow, xmask, F0, F1, F2, F3, F4,
               TS: tl.constexpr, OUT: tl.constexpr, SOFT: tl.constexpr):
    w0, w1, idx, HI = _parts_q6_k(bp, F0, F1, F2, F3, F4, 0)
    BN: tl.constexpr = bp.shape[0]
    c = idx
    acc = _dot_part(acc, tl.reshape(w0, (BN, 128)), xrow, xmask, c, OUT, SOFT)
    return _dot_part(acc, tl.reshape(w1, (BN, 128)), xrow, xmask, c + HI, OUT, SOFT)


#: Types with a fused kernel -> their step function (each step consumes BK=256 of K).
FUSED_TYPES = {
    "Q4_0": _step_q4_0,
    "Q8_0": _step_q8_0,
    "Q4_K": _step_q4_k,
    "Q5_K": _step_q5_k,
    "Q6_K": _step_q6_k,
}


@triton.jit
def _fused_kernel(x, w, y, KV, M, N, K, stride_xm, stride_ym, row_bytes, k_steps_per_split,
                  STEP: tl.constexpr, TS: tl.constexpr, BYTES_PER_STEP: tl.constexpr,
                  F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                  F4: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, OUT: tl.constexpr,
                  PARTIAL: tl.constexpr, SOFT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    # Rows past N re-read row N-1 (in bounds); their results are masked at the store.
    wrow = w + (tl.minimum(rn, N - 1).to(tl.int64) * row_bytes)[:, None, None]
    xrow = x + (rm.to(tl.int64) * stride_xm)[:, None]
    xmask = (rm < M)[:, None]
    k_first = pid_k * k_steps_per_split
    k_last = tl.minimum(k_first + k_steps_per_split, K // 256)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for ks in range(k_first, k_last):
        acc = STEP(acc, wrow + ks * BYTES_PER_STEP, xrow + ks * 256, xmask,
                   F0, F1, F2, F3, F4, TS, OUT, SOFT)
    out_mask = (rn < N)[:, None] & (rm < M)[None, :]
    if not PARTIAL:
        ptrs = y + rm.to(tl.int64)[None, :] * stride_ym + rn[:, None]
        tl.store(ptrs, to_out(acc, OUT, SOFT), mask=out_mask)
    else:
        # float32 partial sums (SPLIT, M, N), reduced in a fixed order by the caller.
        ptrs = y + (pid_k * M + rm.to(tl.int64))[None, :] * N + rn[:, None]
        tl.store(ptrs, acc, mask=out_mask)


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
#: many programs per SM the K dimension is split to reach (0: no split). A first guess, not yet
#: tuned: ``benchmarks/gpu_linear.py --tune`` times the alternatives and installs the best.
RULES: dict[int, tuple[int, int, int, int]] = {16: (32, 4, 4, 2), 32: (32, 4, 4, 2), 64: (32, 4, 4, 2)}


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_m(m: int) -> int:
    """The activation tile height for ``m`` rows."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def split_for(m: int, n: int, k: int, bm: int, bn: int, waves: int, device: torch.device) -> int:
    """K split (a power of two, at most 16) giving at least ``waves`` programs per SM."""
    programs = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    steps = k // BK
    split = 1
    while programs * split < waves * _sm_count(device) and split * 2 <= steps and split < 16:
        split *= 2
    return split


def fused_linear(x2d: torch.Tensor, raw: torch.Tensor, name: str, n: int, *,
                 rule: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``x2d (M, K) @ W.T`` for ``W`` the ``(n, K)`` weight of type ``name`` in ``raw`` (n, row_bytes).

    ``x2d`` is float16 or bfloat16 with unit stride along K; ``K`` a multiple of 256. The output
    is ``(M, n)`` of ``x2d``'s dtype. ``rule`` = (BN, waves, num_warps, num_stages) overrides
    :data:`RULES` (the benchmarks tune with it).
    """
    spec = kernel_spec(name)
    m, k = x2d.shape
    bm = block_m(m)
    bn, waves, num_warps, num_stages = rule or RULES[bm]
    split = split_for(m, n, k, bm, bn, waves, x2d.device)
    steps = k // BK
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    out_dtype = TL_DTYPES[x2d.dtype]
    if split == 1:
        y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    else:
        y = torch.empty((split, m, n), dtype=torch.float32, device=x2d.device)
    f0, f1, f2, f3, f4 = spec.offsets
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
    from ._dequant import iq4_table

    _fused_kernel[grid](x2d, raw, y, iq4_table(x2d.device), m, n, k, x2d.stride(0),
                        y.stride(-2), raw.stride(0), per_split,
                        STEP=FUSED_TYPES[name], TS=spec.type_size,
                        BYTES_PER_STEP=BK // spec.block_size * spec.type_size,
                        F0=f0, F1=f1, F2=f2, F3=f3, F4=f4, BM=bm, BN=bn, OUT=out_dtype,
                        PARTIAL=split > 1, SOFT=soft_bf16(), num_warps=num_warps,
                        num_stages=num_stages, enable_fp_fusion=False)
    if split == 1:
        return y
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    total = m * n
    _reduce_kernel[(triton.cdiv(total, 1024),)](y, out, total, SPLIT=split, OUT=out_dtype,
                                                SOFT=soft_bf16(), BLOCK=1024, num_warps=4)
    return out
