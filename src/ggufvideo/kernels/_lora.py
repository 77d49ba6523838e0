"""The LoRA up-projection added into a layer's output in place: ``out += h @ up_t``.

``h`` is (M, r) with r the (summed) LoRA rank, ``up_t`` is (r, N) -- the scaled up-projections,
transposed -- and ``out`` is the (M, N) base product, possibly a strided view. The product has
a tiny inner dimension, so the work is reading and writing ``out`` once: each program loads one
(BM, r) tile of ``h``, one (r, BN) tile of ``up_t``, does one ``tl.dot`` and adds it into its
(BM, BN) tile of ``out`` in float32, rounding once. cuBLAS' ``addmm_`` picks its usual GEMM
tiling for such a call; at small ranks this kernel is faster (README: LoRA results).

Imports triton at the top: reached only through :mod:`ggufvideo.kernels`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dequant import soft_bf16

__all__ = ["up_add", "MAX_RANK"]

#: The largest (summed) rank the kernel takes: one (BM, rank) tile of ``h`` per program.
MAX_RANK = 256


@triton.jit
def _bf16_bits_to_f32(bits):
    return (bits.to(tl.uint16).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _up_add_kernel(out, h, up, M, N, r, stride_om, stride_hm, R: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BF16_BITS: tl.constexpr):
    # Programs along N are adjacent in launch order, so a row tile of ``h`` is read from L2.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, R)
    row_ok = rm[:, None] < M
    hv = tl.load(h + rm[:, None].to(tl.int64) * stride_hm + rr[None, :],
                 mask=row_ok & (rr[None, :] < r), other=0.0)
    uv = tl.load(up + rr[:, None] * N + rn[None, :],
                 mask=(rr[:, None] < r) & (rn[None, :] < N), other=0.0)
    mask = row_ok & (rn[None, :] < N)
    p = out + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    o = tl.load(p, mask=mask, other=0.0)
    if BF16_BITS:
        # Triton's interpreter has no exact bfloat16: the tensors come in as int16 bit patterns,
        # widened exactly here and rounded to nearest even with integer operations below.
        acc = tl.dot(_bf16_bits_to_f32(hv), _bf16_bits_to_f32(uv))
        total = (_bf16_bits_to_f32(o) + acc).to(tl.uint32, bitcast=True)
        rounded = (total + 0x7FFF + ((total >> 16) & 1)) >> 16
        tl.store(p, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        acc = tl.dot(hv, uv)
        tl.store(p, (o.to(tl.float32) + acc).to(out.dtype.element_ty), mask=mask)


def up_add(out: torch.Tensor, h: torch.Tensor, up_t: torch.Tensor) -> None:
    """``out += h @ up_t`` in place (float32 accumulation, one rounding).

    ``out`` (M, N) and ``h`` (M, r) are 2-D with unit column stride (rows may be strided);
    ``up_t`` (r, N) is contiguous; all three are float16 or bfloat16 on one CUDA device, r <=
    :data:`MAX_RANK`.
    """
    m, n = out.shape
    r = h.shape[1]
    rank_tile = max(16, triton.next_power_of_2(r))
    # 64 x 128 tiles of ``out``, 4 warps: picked from six tile shapes timed on the Wan-14B
    # outputs (M = 32,760, rank 32, an H200); 8 warps for large ranks keep the ``h`` and
    # ``up_t`` tiles in registers.
    bm, bn = 64, 128
    warps = 4 if rank_tile <= 64 else 8
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    bits = out.dtype == torch.bfloat16 and soft_bf16()
    if bits:
        out, h, up_t = out.view(torch.int16), h.view(torch.int16), up_t.view(torch.int16)
    _up_add_kernel[grid](out, h, up_t, m, n, r, out.stride(0), h.stride(0), R=rank_tile,
                         BM=bm, BN=bn, BF16_BITS=bits, num_warps=warps, num_stages=1)
