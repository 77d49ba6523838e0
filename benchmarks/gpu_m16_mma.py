"""Experiment: Q4_K at M <= 16 on the tensor cores through inline-PTX ``mma.sync`` (not adopted).

The library's M = 16 path (``_matmul._fused_kernel``) lets ``tl.dot`` stage the decoded weights
through shared memory, which Triton feeds with one-byte loads and stores. This kernel skips
shared memory: each lane decodes its own weights straight into the registers of the PTX
``mma.m16n8k16`` fragments and issues the instruction itself (``tl.inline_asm_elementwise``).

* A warp takes 16 weight rows; lane ``4r + c`` holds rows ``r`` and ``r + 8`` and, of each 32-byte
  qs group, bytes ``8c .. 8c + 7`` -- so the four lanes of a row cover one 32-element sub-block
  together and every MMA stays inside one scale. The codes become packed 16-bit floats
  ``OFF + code`` by bit pattern (one shift and one and-or per two weights), the activations the
  B fragment (x rows as the MMA's columns), and the scale is applied once per sub-block on the
  float32 result: ``acc += D * sum((OFF + u) x) + (B - OFF * D) * sum(x)``, ``sum(x)`` from a
  second MMA with an all-ones A. No weight is rounded (as in the library's fused kernels).
* The program's warps split K (super-block ``j0 + warp``), summed across warps at the end; the
  next super-block's weight words are loaded before this one's are used.
* Every tensor the MMA sees is 1-d, ``(num_warps * 32,)``: element ``i`` is lane ``i % 32`` of
  warp ``i // 32`` -- the one layout Triton gives such a tensor. A first version used 4-d
  ``(.., 8, 4)`` tensors and was right under Triton 3.7 but wrong on the device's Triton 3.6,
  whose coalescing pass breaks ties between non-contiguous dimensions in the other order and put
  the lanes on different dimensions (checked in both versions' TTGIR).

What it showed (H100, CUDA graphs; numbers and commands in ``gpu_results_h100.md``): correct
(relative error 1.7e-3 bf16 / 2.1e-4 fp16 against the float64 product), but no faster than the
library's path -- 1.0-1.3x the bf16 speed at M = 16, latency bound: ~650 instructions per warp
and super-block (two thirds of them the per-sub-block scale arithmetic and the code/fragment
shuffling that any exact kernel on this block layout needs) and too few warps per SM.

Run: ``python benchmarks/gpu_m16_mma.py`` (GPU: check, then timings), or
``python benchmarks/gpu_m16_mma.py --interpret`` (CPU: the check on small shapes under Triton's
interpreter, which emulates the MMA from its PTX fragment definition).
"""

from __future__ import annotations

import argparse
import os
import sys

if "--interpret" in sys.argv:  # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ggufvideo.kernels._decode import to_out  # noqa: E402
from ggufvideo.kernels._dequant import TL_DTYPES, soft_bf16  # noqa: E402
from ggufvideo.kernels._matmul import _bits_to_f32, _code_f32, _finish_split, arrival_counters  # noqa: E402

# bf16 / fp16 bit patterns: a code u in the low bits of OFF's pattern is OFF + u; 1.0 twice.
CODE_BITS = {torch.bfloat16: 0x43004300, torch.float16: 0x64006400}
F32_MAGIC = 0x4B000000  # float32 2**23: byte b in its low bits is 2**23 + b


@triton.jit
def _pair_f32(v, FP16: tl.constexpr):
    """The two 16-bit floats packed in int32 ``v`` (low half first), as float32."""
    if FP16:
        lo = (v & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = ((v >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        lo = (v << 16).to(tl.float32, bitcast=True)
        hi = (v & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16: tl.constexpr):
    """mma.m16n8k16 from its PTX fragment definition, for the interpreter (which has no warps):
    lane (r, c) = element 4r + c of each warp's 32; A rows r / r + 8 hold k-slots 2c, 2c+1 (first
    register) and 2c+8, 2c+9 (second); B column r the same k-slots; C row r, columns 2c, 2c+1."""
    L: tl.constexpr = a0.shape[0]
    W: tl.constexpr = L // 32
    a0l, a0h = _pair_f32(tl.reshape(a0, (W, 8, 1, 4)), FP16)
    a1l, a1h = _pair_f32(tl.reshape(a1, (W, 8, 1, 4)), FP16)
    a2l, a2h = _pair_f32(tl.reshape(a2, (W, 8, 1, 4)), FP16)
    a3l, a3h = _pair_f32(tl.reshape(a3, (W, 8, 1, 4)), FP16)
    b0l, b0h = _pair_f32(tl.reshape(b0, (W, 1, 8, 4)), FP16)
    b1l, b1h = _pair_f32(tl.reshape(b1, (W, 1, 8, 4)), FP16)
    top = tl.sum(a0l * b0l + a0h * b0h + a2l * b1l + a2h * b1h, axis=3)  # (W, row, col)
    bot = tl.sum(a1l * b0l + a1h * b0h + a3l * b1l + a3h * b1h, axis=3)
    e0, e1 = tl.split(tl.reshape(top, (W, 8, 4, 2)))
    f0, f1 = tl.split(tl.reshape(bot, (W, 8, 4, 2)))
    return (c0 + tl.reshape(e0, (L,)), c1 + tl.reshape(e1, (L,)), c2 + tl.reshape(f0, (L,)),
            c3 + tl.reshape(f1, (L,)))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16: tl.constexpr, SOFT: tl.constexpr):
    """``C + A @ B`` for one m16n8k16 tile, operands in PTX fragment order (16-bit floats packed
    two to an int32; C float32), one element per lane."""
    if SOFT:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, FP16)
    if FP16:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, "
            "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, "
        "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _w4(v):
    """The four words along the last (in-thread) dimension of an (L, 4) tensor."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], 2, 2)))
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


@triton.jit
def _head(head, ok):
    """A Q4_K head (L, 4) words -> d, dmin (zero where not ``ok``) and the eight 6-bit scales and
    mins, four to a word (bytes 0..3: sub-blocks 0..3 / 4..7)."""
    hd, s0, s1, s2 = _w4(head)
    d = tl.where(ok, _bits_to_f32(hd), 0.0)
    dmin = tl.where(ok, _bits_to_f32(hd >> 16), 0.0)
    return (d, dmin, s0 & 0x3F3F3F3F, (s2 & 0x0F0F0F0F) | ((s0 >> 2) & 0x30303030),
            s1 & 0x3F3F3F3F, ((s2 >> 4) & 0x0F0F0F0F) | ((s1 >> 2) & 0x30303030))


@triton.jit
def _affine(d, dmin, sc_a, sc_b, mn_a, mn_b, s: tl.constexpr, OFF: tl.constexpr, f32magic,
            SOFT: tl.constexpr):
    """Sub-block ``s``'s (D, B'): weight * x summed = D * sum((OFF + u) x) + B' * sum(x)."""
    sc = _code_f32(sc_a if s < 4 else sc_b, s % 4, f32magic, SOFT)
    mn = _code_f32(mn_a if s < 4 else mn_b, s % 4, f32magic, SOFT)
    D = d * (sc.to(tl.float32, bitcast=True) - 8388608.0)
    return D, -(dmin * (mn.to(tl.float32, bitcast=True) - 8388608.0)) - D * OFF


@triton.jit
def _codes(word, sh: tl.constexpr, code_bits):
    """Nibbles at bits sh..sh+3 and sh+16..sh+19 as the packed 16-bit floats OFF + code."""
    return ((word >> sh) & 0x000F000F) | code_bits


@triton.jit
def _b_frag(x0, x1, SOFT: tl.constexpr):
    """B fragment registers from activation words (v0, v1), (v2, v3): (v0, v2) and (v1, v3)."""
    if SOFT:
        return (x0 & 0xFFFF) | (x1 << 16), ((x0 >> 16) & 0xFFFF) | (x1 & -65536)
    lo = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [x0, x1],
                                   dtype=tl.int32, is_pure=True, pack=1)
    hi = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [x0, x1],
                                   dtype=tl.int32, is_pure=True, pack=1)
    return lo, hi


@triton.jit
def _x_half(acc0, acc1, acc2, acc3, a0, a1, a2, a3, e0, e1, e2, e3, xw, Dl, Bl, Dh, Bh,
            FP16: tl.constexpr, SOFT: tl.constexpr):
    """One sub-block against 8 activation rows: two MMAs for the codes, two for sum(x)."""
    ONES: tl.constexpr = 0x3C003C00 if FP16 else 0x3F803F80
    x0, x1, x2, x3 = _w4(xw)
    zero = tl.zeros(x0.shape, tl.float32)
    one = ONES + 0 * x0
    b0, b1 = _b_frag(x0, x1, SOFT)
    b2, b3 = _b_frag(x2, x3, SOFT)
    r0, r1, r2, r3 = _mma(a0, a1, a2, a3, b0, b1, zero, zero, zero, zero, FP16, SOFT)
    r0, r1, r2, r3 = _mma(e0, e1, e2, e3, b2, b3, r0, r1, r2, r3, FP16, SOFT)
    s0, s1, _, _ = _mma(one, one, one, one, b0, b1, zero, zero, zero, zero, FP16, SOFT)
    s0, s1, _, _ = _mma(one, one, one, one, b2, b3, s0, s1, s0, s1, FP16, SOFT)
    return (acc0 + Dl * r0 + Bl * s0, acc1 + Dl * r1 + Bl * s1, acc2 + Dh * r2 + Bh * s0,
            acc3 + Dh * r3 + Bh * s1)


@triton.jit
def _load_super_block(wlo, whi, c):
    """Lane (r, c)'s words of one super-block: both rows' heads (L, 4) and, per qs group g, bytes
    8c..8c+7 of both rows (L, 2) -- one load per group: a wider tensor would put the groups on
    different lanes."""
    w4 = tl.arange(0, 4)[None, :]
    w2 = tl.arange(0, 2)[None, :] + 2 * c + 4
    return (tl.load(wlo + w4), tl.load(whi + w4), tl.load(wlo + w2), tl.load(whi + w2),
            tl.load(wlo + w2 + 8), tl.load(whi + w2 + 8), tl.load(wlo + w2 + 16),
            tl.load(whi + w2 + 16), tl.load(wlo + w2 + 24), tl.load(whi + w2 + 24))


@triton.jit
def _super_block(acc, hl, hh, q, xp, x_hi, ok, code_bits, f32magic, H: tl.constexpr,
                 FP16: tl.constexpr, SOFT: tl.constexpr):
    OFF: tl.constexpr = 1024.0 if FP16 else 128.0
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc
    dl, ml, sal, sbl, mal, mbl = _head(hl, ok)
    dh, mh, sah, sbh, mah, mbh = _head(hh, ok)
    for g in tl.static_range(4):
        ql0, ql1 = tl.split(q[2 * g])
        qh0, qh1 = tl.split(q[2 * g + 1])
        for p in tl.static_range(2):
            Dl, Bl = _affine(dl, ml, sal, sbl, mal, mbl, 2 * g + p, OFF, f32magic, SOFT)
            Dh, Bh = _affine(dh, mh, sah, sbh, mah, mbh, 2 * g + p, OFF, f32magic, SOFT)
            a0 = _codes(ql0, 4 * p, code_bits)
            a1 = _codes(qh0, 4 * p, code_bits)
            a2 = _codes(ql0, 4 * p + 8, code_bits)
            a3 = _codes(qh0, 4 * p + 8, code_bits)
            e0 = _codes(ql1, 4 * p, code_bits)
            e1 = _codes(qh1, 4 * p, code_bits)
            e2 = _codes(ql1, 4 * p + 8, code_bits)
            e3 = _codes(qh1, 4 * p + 8, code_bits)
            acc0, acc1, acc2, acc3 = _x_half(acc0, acc1, acc2, acc3, a0, a1, a2, a3, e0, e1, e2,
                                             e3, tl.load(xp + 32 * g + 16 * p), Dl, Bl, Dh, Bh,
                                             FP16, SOFT)
            if H == 2:
                acc4, acc5, acc6, acc7 = _x_half(acc4, acc5, acc6, acc7, a0, a1, a2, a3, e0, e1,
                                                 e2, e3, tl.load(xp + x_hi + 32 * g + 16 * p),
                                                 Dl, Bl, Dh, Bh, FP16, SOFT)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _warp_sum(a, NW: tl.constexpr):
    return tl.sum(tl.reshape(a, (NW, 32)), axis=0)


@triton.jit
def _mma_q4_k_kernel(x, w, y, out, count, n_split, M, N, K, stride_xm, row_bytes,
                     steps_per_split, code_bits, f32magic, NW: tl.constexpr, H: tl.constexpr,
                     OUT: tl.constexpr, PARTIAL: tl.constexpr, FIXUP: tl.constexpr,
                     SOFT: tl.constexpr):
    FP16: tl.constexpr = OUT == tl.float16
    L: tl.constexpr = NW * 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    i = tl.arange(0, L)
    r = (i % 32) // 4
    c = (i % 4)[:, None]
    wp = w.to(tl.pointer_type(tl.int32))
    wlo = (wp + tl.minimum(pid_n * 16 + r, N - 1).to(tl.int64) * (row_bytes // 4))[:, None]
    whi = (wp + tl.minimum(pid_n * 16 + r + 8, N - 1).to(tl.int64) * (row_bytes // 4))[:, None]
    # x rows past M re-read row M - 1 (their outputs are not stored): no masks on the loads.
    xrow_lo = tl.minimum(r, M - 1).to(tl.int64)
    xrow_hi = tl.minimum(r + 8, M - 1).to(tl.int64)
    xp = (x.to(tl.pointer_type(tl.int32)) + (xrow_lo * (stride_xm // 2))[:, None] + 4 * c
          + tl.arange(0, 4)[None, :])
    x_hi = ((xrow_hi - xrow_lo) * (stride_xm // 2))[:, None]
    k_first = pid_k * steps_per_split
    k_last = tl.minimum(k_first + steps_per_split, K // 256)
    z = tl.zeros((L,), dtype=tl.float32)
    acc = (z, z, z, z, z, z, z, z)
    # Warp v takes super-blocks k_first + v, + NW, ...; past the split's end (idle warps of the
    # last round) it re-reads the last one with zero scales.
    sb = k_first + i // 32
    rd = tl.minimum(sb, k_last - 1)[:, None]
    cur = _load_super_block(wlo + rd * 36, whi + rd * 36, c)
    for _ in range(k_first, k_last, NW):
        nb = sb + NW
        nrd = tl.minimum(nb, k_last - 1)[:, None]
        nxt = _load_super_block(wlo + nrd * 36, whi + nrd * 36, c)
        acc = _super_block(acc, cur[0], cur[1], cur[2:], xp + rd * 128, x_hi, sb < k_last,
                           code_bits, f32magic, H, FP16, SOFT)
        sb = nb
        rd = nrd
        cur = nxt
    # lane (r, c): acc 0/1 = weight row r, x rows 2c / 2c + 1; 2/3 row r + 8; 4..7 x rows + 8.
    v = tl.join(tl.join(tl.join(_warp_sum(acc[0], NW), _warp_sum(acc[1], NW)),
                        tl.join(_warp_sum(acc[2], NW), _warp_sum(acc[3], NW))),
                tl.join(tl.join(_warp_sum(acc[4], NW), _warp_sum(acc[5], NW)),
                        tl.join(_warp_sum(acc[6], NW), _warp_sum(acc[7], NW))))
    # v: (lane, j, rh, h) -- each join adds the last dimension
    lane = tl.arange(0, 32)[:, None, None, None]
    j = tl.arange(0, 2)[None, :, None, None]
    rh = tl.arange(0, 2)[None, None, :, None]
    h = tl.arange(0, 2)[None, None, None, :]
    n_out = pid_n * 16 + lane // 4 + 8 * rh
    m_out = 2 * (lane % 4) + j + 8 * h
    mask = (n_out < N) & (m_out < M)
    offs = m_out.to(tl.int64) * N + n_out
    if not PARTIAL:
        tl.store(y + offs, to_out(v, OUT, SOFT), mask=mask)
    else:
        tl.store(y + pid_k.to(tl.int64) * M * N + offs, v, mask=mask)
        if FIXUP:
            _finish_split(y, out, count + pid_n, n_split, M * N, offs, mask, OUT, SOFT)


def mma_linear(x: torch.Tensor, raw: torch.Tensor, n: int, num_warps: int = 4, split: int = 1,
               maxnreg: int | None = None) -> torch.Tensor:
    """``x (M <= 16, K) @ W.T`` for the Q4_K weight ``raw`` (n, row_bytes), K split ``split`` ways
    across programs (partials added in-kernel) and ``num_warps`` ways within one."""
    m, k = x.shape
    assert m <= 16 and k % 256 == 0 and x.stride(1) == 1 and x.stride(0) % 2 == 0
    steps = k // 256
    per = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per)
    grid = (triton.cdiv(n, 16), split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    y = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    count = arrival_counters(x.device, grid[0]) if split > 1 else None
    if count is None:
        count = torch.zeros(grid[0], dtype=torch.int32, device=x.device)
    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
    _mma_q4_k_kernel[grid](x, raw, y, out, count, split, m, n, k, x.stride(0), raw.stride(0), per,
                           CODE_BITS[x.dtype], F32_MAGIC, NW=num_warps, H=1 if m <= 8 else 2,
                           OUT=TL_DTYPES[x.dtype], PARTIAL=split > 1, FIXUP=split > 1,
                           SOFT=soft_bf16(), num_warps=num_warps, num_stages=1, **extra)
    return out


def rel_err_vs_exact(x: torch.Tensor, raw: torch.Tensor, n: int, **kw) -> float:
    """Relative error of :func:`mma_linear` against the float64 product with the exact weights."""
    from ggufvideo.quants import dequantize

    w = dequantize(raw, "Q4_K", dtype=torch.float32).reshape(n, -1).double()
    ref = x.double() @ w.T
    got = mma_linear(x, raw, n, **kw).double()
    return ((got - ref).norm() / ref.norm()).item()


#: Largest relative error accepted: the output's rounding (bf16 / fp16) bounds it.
TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1e-3}


def check(device: torch.device, cases) -> bool:
    """Each case (M, N, K, mma_linear options) in bf16 and fp16 against the exact product."""
    from gpu_dequant import random_blocks

    ok = True
    for m, n, k, kw in cases:
        raw = random_blocks("Q4_K", n * k // 256, device).view(n, -1)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, k, device=device).to(dtype)
            err = rel_err_vs_exact(x, raw, n, **kw)
            ok &= err < TOLERANCE[dtype]
            print(f"check M={m} N={n} K={k} {kw} {str(dtype)[6:]}: relative error {err:.2e}",
                  flush=True)
    return ok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true",
                    help="CPU check on small shapes under Triton's interpreter")
    ap.add_argument("--m", type=int, default=16)
    args = ap.parse_args(argv)
    if args.interpret:
        cases = [(5, 40, 1280, dict(num_warps=2)), (13, 33, 1792, dict(num_warps=2, split=3))]
        sys.exit(0 if check(torch.device("cpu"), cases) else "relative error too large")
    if not torch.cuda.is_available():
        sys.exit("gpu_m16_mma.py needs a CUDA device (or --interpret)")
    import torch.nn.functional as F
    from gpu_dequant import random_blocks
    from gpu_linear import SHAPES, bench_graph

    from ggufvideo.kernels._matmul import fused_linear

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), "torch", torch.__version__, "triton", triton.__version__)
    if not check(dev, [(args.m, 5120, 5120, {}), (7, 72, 2304, dict(num_warps=8, split=2))]):
        sys.exit("relative error too large")
    configs = [(4, 1, None), (4, 2, 96), (8, 1, 80), (2, 4, 80)]
    for k, n in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        raw = random_blocks("Q4_K", n * k // 256, dev).view(n, -1)
        x = torch.randn(args.m, k, device=dev, dtype=torch.bfloat16)
        base = min(bench_graph(lambda: F.linear(x, w)) for _ in range(2)) * 1e3
        lib = bench_graph(lambda: fused_linear(x, raw, "Q4_K", n)) * 1e3
        line = [f"K={k} N={n} M={args.m}: bf16 {base:.1f} us, library {lib:.1f} us "
                f"({base / lib:.2f}x)"]
        for nw, split, reg in configs:
            t = bench_graph(lambda: mma_linear(x, raw, n, nw, split, reg)) * 1e3
            line.append(f"mma w{nw} s{split} r{reg} {t:.1f} us ({base / t:.2f}x)")
        print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
