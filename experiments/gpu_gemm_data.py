"""Does cuBLAS's bf16 GEMM time depend on the weight's values? (M = 32760, Wan-14B shapes)

Times, interleaved over four rounds (medians): bf16 ``F.linear`` on a ``randn / sqrt(K)`` weight;
the quant-aware Linear on random blocks; the decode alone; ``F.linear`` on the decoded weight;
and on the decoded weight rescaled to the randn weight's size. On an H100 the GEMM on the decoded
random blocks took 1.02-1.07x the time of the same values rescaled (six cases; results in
``gpu_results_h100.md``): the time follows the data (power draw, then clocks), which is why
``gpu_linear.py`` compares the quant Linear with bf16 on the same decoded values.

Run: ``python experiments/gpu_gemm_data.py [--types Q4_K Q6_K Q8_0]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from gpu_linear import bench_interleaved, quant_linear_module  # noqa: E402

from ggufvideo.kernels._dequant import dequantize_into  # noqa: E402

M = 32760
SHAPES = [(5120, 5120), (5120, 13824)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=["Q4_K", "Q6_K", "Q8_0"])
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    print("| type | (K,N) | decoded std | bf16 randn us | quant | decode | GEMM decoded | "
          "GEMM decoded rescaled |\n|---|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        x = torch.randn(M, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        for name in a.types:
            lin = quant_linear_module(name, k, n, dev)
            raw = lin.weight.raw
            ws = torch.empty(n * k, dtype=torch.bfloat16, device=dev)
            dequantize_into(raw, name, ws)
            wd = ws.view(n, k).clone()
            std = wd.float().std().item()
            wr = (wd.float() / std / k ** 0.5).to(torch.bfloat16)
            cases = {"bf16": lambda: F.linear(x, w), "quant": lambda: lin(x),
                     "decode": lambda: dequantize_into(raw, name, ws),
                     "decoded": lambda: F.linear(x, wd), "rescaled": lambda: F.linear(x, wr)}
            with torch.no_grad():
                us = {key: v * 1e3 for key, v in bench_interleaved(cases, 4).items()}
            cells = [f"{us[key]:.0f} ({us[key] / us['bf16']:.3f}x)"
                     for key in ("quant", "decode", "decoded", "rescaled")]
            print(f"| {name} | {k},{n} | {std:.3g} | {us['bf16']:.0f} | " + " | ".join(cells)
                  + " |", flush=True)
            del lin, ws, wd, wr


if __name__ == "__main__":
    main()
