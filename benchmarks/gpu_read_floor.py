"""How fast can any kernel that reads the quantized bytes be? The floor under the one-row ratios.

At M = 1 a linear layer is a pass over its weight. This script times, under the same CUDA-graph
method as ``gpu_linear.py`` (one replay, L2 flushed by ``triton.testing.do_bench``):

* an empty graph (one 1-element fill): what every single call costs before reading anything;
* a plain contiguous read of the Q4_K bytes (a Triton kernel XOR-ing them together as int32
  words, each program reading ``BLOCK x ITERS`` words with all loads issued up front) -- no
  decoding, no activations;
* bf16 ``F.linear`` at M = 1 (cuBLAS's GEMV) and our fused one-row kernel.

``bf16 / read`` is then the best ratio any Q4_K kernel could show this way, and ``fused / read``
how far ours is from it. Run: ``python benchmarks/gpu_read_floor.py``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gpu_dequant import random_blocks  # noqa: E402
from gpu_linear import SHAPES, bench_graph  # noqa: E402


@triton.jit
def _read_kernel(words, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # XOR this program's ITERS consecutive blocks of words together: the loads do not depend on
    # each other, so all are in flight at once (the XOR only keeps them from being dropped).
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(words + offs, mask=offs < n, other=0)
    tl.store(out + pid, tl.xor_sum(acc, axis=0))


def read_all(t: torch.Tensor, block: int = 1024, iters: int = 4,
             num_warps: int = 4) -> torch.Tensor:
    """Read every byte of ``t`` (size a multiple of 4) once; returns each program's XOR of words."""
    words = t.reshape(-1).view(torch.int32)
    grid = triton.cdiv(words.numel(), block * iters)
    out = torch.empty(grid, dtype=torch.int32, device=t.device)
    _read_kernel[(grid,)](words, out, words.numel(), BLOCK=block, ITERS=iters,
                          num_warps=num_warps)
    return out


def main() -> None:
    from ggufvideo.kernels._matmul import fused_linear

    if not torch.cuda.is_available():
        sys.exit("gpu_read_floor.py needs a CUDA device")
    dev = torch.device("cuda")
    one = torch.zeros(1, device=dev)
    print(f"empty graph: {bench_graph(lambda: one.fill_(1.0)) * 1e3:.1f} us")
    print("| (K,N) | bf16 us | Q4_K read us | Q4_K fused us | bf16/read | bf16/fused |")
    print("|---|---|---|---|---|---|")
    for k, n in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        raw = random_blocks("Q4_K", n * k // 256, dev).view(n, -1)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        base = bench_graph(lambda: F.linear(x, w)) * 1e3
        read = bench_graph(lambda: read_all(raw)) * 1e3
        fused = bench_graph(lambda: fused_linear(x, raw, "Q4_K", n)) * 1e3
        print(f"| {k},{n} | {base:.1f} | {read:.1f} | {fused:.1f} | {base / read:.2f} | "
              f"{base / fused:.2f} |", flush=True)


if __name__ == "__main__":
    main()
