"""A small target for Nsight Compute: bf16 ``F.linear`` and the fused quantized kernel side by side.

Runs each call once to compile and warm up, then once more inside a profiler range, so that

    ncu --clock-control none --profile-from-start off \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python experiments/ncu_linear.py --type Q4_K --k 5120 --n 5120 --ms 1 16

reports exactly the kernels of those calls: cuBLAS's for bf16, and for the quantized weight the
fused kernel plus, where K is split across programs, the small reduction kernel that adds the
partial sums. ``benchmarks/gpu_results_h100.md`` has what it showed on an H100 (kernel durations,
achieved bandwidth, occupancy, issue stalls) and what was concluded from it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from gpu_dequant import random_blocks  # noqa: E402

from ggufvideo.kernels import _matmul  # noqa: E402
from ggufvideo.quants import get_quant_type  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="Q4_K", choices=sorted(_matmul.FUSED_TYPES))
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=5120)
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("ncu_linear.py needs a CUDA device")
    dev = torch.device("cuda")
    qt = get_quant_type(args.type)
    raw = random_blocks(args.type, args.n * args.k // qt.block_size, dev).view(args.n, -1)
    w = torch.randn(args.n, args.k, device=dev, dtype=torch.bfloat16)
    xs = [torch.randn(m, args.k, device=dev, dtype=torch.bfloat16) for m in args.ms]

    def calls() -> None:
        for x in xs:
            F.linear(x, w)
            _matmul.fused_linear(x, raw, args.type, args.n)

    calls()  # compile and warm up outside the profiled range
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    calls()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
