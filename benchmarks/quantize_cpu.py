"""Quantization throughput on CPU: ggufvideo vs ggml's own C quantizer vs gguf-py (numpy).

For every type, ``--rows`` rows of ``--cols`` Gaussian float32 values (a weight-like tensor) are
encoded by each implementation in the same process, interleaved within each repeat so machine noise
hits them alike; the best of ``--repeat`` runs is reported as Melem/s.

    python benchmarks/quantize_cpu.py                          # every quantizable type
    python benchmarks/quantize_cpu.py --types Q4_K,Q8_0 --rows 512 --imatrix

- ggml: ``ggml_quantize_chunk`` from pywhispercpp's ``libggml-base`` via ctypes (the oracle of the
  tests); it is single-threaded by construction.
- gguf-py: its numpy ``quantize`` (Q4_0..Q8_0, BF16 only; no importance matrix).
- ggufvideo: ``ggufvideo.quantize`` with ``--threads`` torch intra-op threads (default 1, like for
  like with ggml; 0 keeps torch's default, which on a busy machine can be much slower).
``ratio`` = ggufvideo / ggml (>1: ggufvideo is faster). ggufvideo's bytes are checked identical to
ggml's before timing; a type whose quantizer is missing or fails is reported and skipped.
The machine's load average is printed before and after: other processes on the cores hurt the
multi-threaded torch side far more than ggml's single thread, so compare runs at similar load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from ggufvideo.quants import get_quant_type, quantize

DEFAULT_TYPES = ("F16,BF16,Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS")
GGUF_PY_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"}


def _oracle():
    """tests/oracle.py's wrapper over ggml's C quantizer, or None when pywhispercpp is absent."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    try:
        import oracle
    except ImportError:
        return None
    lib = oracle.load()
    return oracle.Oracle(lib) if lib is not None else None


def _load() -> str:
    """The 1/5/15-minute load averages, or '?' where the platform has none."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "?"


def _timed(fn: Callable[[], object], times: list[float]) -> None:
    """Run ``fn`` once and append its wall time to ``times``."""
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated ggml type names")
    ap.add_argument("--rows", type=int, default=256, help="rows per tensor (default 256)")
    ap.add_argument("--cols", type=int, default=4096, help="elements per row (default 4096)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per implementation; best is kept")
    ap.add_argument("--imatrix", action="store_true",
                    help="quantize with a random importance matrix")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    oracle = _oracle()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    xt = torch.from_numpy(x)
    im = rng.random(args.cols, dtype=np.float32) if args.imatrix else None
    imt = torch.from_numpy(im) if im is not None else None
    n = x.size

    print(f"# {args.rows}x{args.cols} float32, imatrix={'yes' if args.imatrix else 'no'}, "
          f"torch {torch.__version__} threads={torch.get_num_threads()}, "
          f"ggml={'yes' if oracle else 'absent'}; Melem/s, best of {args.repeat}; "
          f"load average {_load()}")
    print(f"{'type':8} {'ggufvideo':>10} {'ggml':>10} {'gguf-py':>10} {'ratio':>7}  check")
    for name in (t.strip().upper() for t in args.types.split(",") if t.strip()):
        qtype = GGMLQuantizationType[name]
        qt = get_quant_type(qtype)
        if not qt.can_quantize:
            print(f"{name:8} skipped: no quantizer")
            continue
        try:
            ours = quantize(xt, qtype, imatrix=imt).numpy()
        except Exception as e:  # a quantizer still being written by someone else
            print(f"{name:8} skipped: {type(e).__name__}: {e}")
            continue
        check = "-"
        if oracle is not None:
            ref = oracle.quantize(x, qtype, im)
            check = "bytes identical" if np.array_equal(ref, ours) else \
                f"DIFFERS in {(ref != ours).any(axis=1).sum()} rows"
        runs: dict[str, list[float]] = {"ours": [], "ggml": [], "gguf": []}
        use_gguf = name in GGUF_PY_TYPES and im is None
        for _ in range(args.repeat):
            _timed(lambda: quantize(xt, qtype, imatrix=imt), runs["ours"])
            if oracle is not None:
                _timed(lambda: oracle.quantize(x, qtype, im), runs["ggml"])
            if use_gguf:
                _timed(lambda: gguf_quants.quantize(x, qtype), runs["gguf"])

        def rate(key: str) -> float | None:
            return n / min(runs[key]) / 1e6 if runs[key] else None

        ours_r, ggml_r, gguf_r = rate("ours"), rate("ggml"), rate("gguf")
        fmt = lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10}"  # noqa: E731
        ratio = f"{ours_r / ggml_r:7.2f}" if ggml_r else f"{'-':>7}"
        print(f"{name:8} {fmt(ours_r)} {fmt(ggml_r)} {fmt(gguf_r)} {ratio}  {check}")
    print(f"# load average after: {_load()}")


if __name__ == "__main__":
    main()
