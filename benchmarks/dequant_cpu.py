"""Dequantization throughput on CPU: ggufvideo vs gguf-py (numpy) vs diffusers (torch).

For every type, one 5120x5120 tensor of random blocks (finite float16 scales) is decoded by each
implementation in the same process, the implementations interleaved within each repeat so that
machine noise hits them alike; the best time of ``--repeat`` runs is reported as Melem/s.

    python benchmarks/dequant_cpu.py                       # every implemented type
    python benchmarks/dequant_cpu.py --types Q4_K,Q8_0 --repeat 9

Columns: float32 output for all three (gguf-py only produces float32), bfloat16 output for
ggufvideo and diffusers. ``ratio`` is ggufvideo / the faster peer at that dtype. ggufvideo's
float32 output is checked bit-identical to gguf-py's before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ggufvideo.quants import dequantize, get_quant_type, registered_types

DEFAULT_ROWS = 5120
DEFAULT_COLS = 5120


def random_rows(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """``rows`` rows of ``cols`` elements of ``qtype`` as raw bytes, every float field finite."""
    qt = get_quant_type(qtype)
    rng = np.random.default_rng(seed)
    if qt.torch_dtype is not None and qt.torch_dtype.is_floating_point:
        vals = rng.standard_normal((rows, cols), dtype=np.float32)
        t = torch.from_numpy(vals).to(qt.torch_dtype)
        return t.view(torch.uint8).numpy().reshape(rows, -1).copy()
    n_blocks = rows * cols // qt.block_size
    raw = rng.integers(0, 256, size=(n_blocks, qt.type_size()), dtype=np.uint8)
    for f in qt.layout.fields:
        if f.dtype not in (torch.float16, torch.bfloat16):
            continue
        # Draw small finite scales: magnitudes like real weights, never inf/nan.
        vals = rng.uniform(-2e-2, 2e-2, size=(n_blocks, f.count)).astype(np.float32)
        vt = torch.from_numpy(vals).to(f.dtype).view(torch.uint8).numpy()
        raw[:, f.offset:f.offset + f.nbytes] = vt.reshape(n_blocks, f.nbytes)
    return raw.reshape(rows, -1)


def _diffusers_fn(qtype: GGMLQuantizationType) -> Callable | None:
    try:
        from diffusers.quantizers.gguf.utils import dequantize_functions
    except Exception:  # diffusers is an optional benchmark dependency
        return None
    fn = dequantize_functions.get(qtype)
    if fn is None:
        return None
    bs, ts = GGML_QUANT_SIZES[qtype]

    def run(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        blocks = data.reshape(-1, ts)
        return fn(blocks, bs, ts, dtype).reshape(data.shape[0], -1)

    return run


def _implemented(qtype: GGMLQuantizationType) -> bool:
    qt = get_quant_type(qtype)
    try:
        qt.dequantize_blocks(torch.zeros((1, qt.type_size()), dtype=torch.uint8))
    except NotImplementedError:
        return False
    return True


def _gguf_py_supports(qtype: GGMLQuantizationType, data: np.ndarray) -> bool:
    try:
        gguf_quants.dequantize(data[:1], qtype)
    except NotImplementedError:
        return False
    return True


def bench_type(qtype: GGMLQuantizationType, rows: int, cols: int, repeat: int) -> dict[str, float]:
    """Best seconds per implementation/dtype for one ``rows x cols`` tensor of ``qtype``."""
    data_np = random_rows(qtype, rows, cols)
    data = torch.from_numpy(data_np)
    runs: dict[str, Callable[[], object]] = {
        "ggufvideo f32": lambda: dequantize(data, qtype, dtype=torch.float32),
        "ggufvideo bf16": lambda: dequantize(data, qtype, dtype=torch.bfloat16),
    }
    if _gguf_py_supports(qtype, data_np):
        ref = gguf_quants.dequantize(data_np, qtype)
        got = dequantize(data, qtype, dtype=torch.float32).numpy()
        if ref.shape != got.shape or not np.array_equal(ref.view(np.uint32), got.view(np.uint32)):
            raise AssertionError(f"{qtype.name}: ggufvideo float32 differs from gguf-py")
        runs["gguf-py f32"] = lambda: gguf_quants.dequantize(data_np, qtype)
    dfn = _diffusers_fn(qtype)
    if dfn is not None:
        runs["diffusers f32"] = lambda: dfn(data, torch.float32)
        runs["diffusers bf16"] = lambda: dfn(data, torch.bfloat16)
    best = {k: float("inf") for k in runs}
    for fn in runs.values():  # warm-up: lazy tables, allocator
        fn()
    for _ in range(repeat):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _fmt(v: float | None, width: int, prec: int = 0) -> str:
    return f"{v:{width}.{prec}f}" if v is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="",
                    help="comma-separated ggml type names (default: every implemented type)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="timed runs per implementation (the best is kept)")
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    ap.add_argument("--cols", type=int, default=DEFAULT_COLS)
    args = ap.parse_args(argv)
    # gguf-py's numpy decoders warn on overflow for some random IQ1 scales; the timing is unaffected.
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    if args.types:
        qtypes = [get_quant_type(t.strip()).qtype for t in args.types.split(",") if t.strip()]
    else:
        qtypes = [q for q in registered_types()
                  if q not in (GGMLQuantizationType.F32, GGMLQuantizationType.F64,
                               GGMLQuantizationType.I8, GGMLQuantizationType.I16,
                               GGMLQuantizationType.I32, GGMLQuantizationType.I64)]
    n = args.rows * args.cols
    print(f"# {args.rows}x{args.cols} ({n / 1e6:.1f} Melem), best of {args.repeat}, "
          f"torch {torch.__version__} threads={torch.get_num_threads()}, "
          "Melem/s (higher is better)")
    head = (f"{'type':8s} {'ours f32':>9s} {'gguf-py':>8s} {'diffusers':>9s} {'ratio':>6s} | "
            f"{'ours bf16':>9s} {'diffusers':>9s} {'ratio':>6s}")
    print(head)
    print("-" * len(head))
    for q in qtypes:
        if not _implemented(q):
            print(f"{q.name:8s} (not implemented, skipped)")
            continue
        best = bench_type(q, args.rows, args.cols, args.repeat)
        rate = {k: n / v / 1e6 for k, v in best.items()}
        peers32 = [rate[k] for k in ("gguf-py f32", "diffusers f32") if k in rate]
        ratio32 = rate["ggufvideo f32"] / max(peers32) if peers32 else None
        ratio16 = (rate["ggufvideo bf16"] / rate["diffusers bf16"]
                   if "diffusers bf16" in rate else None)
        print(f"{q.name:8s} {rate['ggufvideo f32']:9.0f} {_fmt(rate.get('gguf-py f32'), 8)} "
              f"{_fmt(rate.get('diffusers f32'), 9)} {_fmt(ratio32, 6, 2)} | "
              f"{rate['ggufvideo bf16']:9.0f} {_fmt(rate.get('diffusers bf16'), 9)} "
              f"{_fmt(ratio16, 6, 2)}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
