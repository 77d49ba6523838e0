"""Quant-aware Linear vs bf16 ``F.linear`` on Wan-14B shapes, as time ratios (>1 = slower).

The bf16 side multiplies by the same values (the decoded quant weight), since a GEMM's time
depends on its data (see :func:`run`).

Shapes (K, N) in {(5120, 5120), (5120, 13824), (13824, 5120)}, activation rows
M in {1, 16, 64, 512, 4096, 32760}, bf16. The quant-aware Linear is ``nn.Linear`` swapped by
:func:`ggufvideo.ops.swap_quant_layers` holding a :class:`GGMLTensor` weight of random blocks;
on CUDA it takes the fused kernel for M <= 64 (the default) and otherwise decodes into a reused
workspace and calls cuBLAS; for M <= 64 the decode + cuBLAS path is also timed (fused kernel
switched off), eagerly and under CUDA graphs.

``--tune`` first sweeps the fused kernel's tile/split choices for Q4_K at M = 1, 16, 64 and
installs the best for the rest of the run.
``--one-row`` instead compares, at M = 1, the chunked kernel with the GEMV / row kernel per rule;
``--one-row-ms 1 2 4`` adds the row / GEMV kernels on 2 and 4 activation rows against the
default path and the tensor-core path (the sm_90 ``cuda_core_rows`` in
``ggufvideo.kernels.settings`` were chosen from it).
``--torch-path`` adds the ratio of the torch decode path (kernels switched off) at M=1 and 32760.
Run: ``python benchmarks/gpu_linear.py [--types Q4_K Q8_0] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_dequant import bench, random_blocks  # noqa: E402

from ggufvideo import GGMLTensor  # noqa: E402
from ggufvideo.ops import swap_quant_layers  # noqa: E402
from ggufvideo.quants import get_quant_type  # noqa: E402

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]
MS = [1, 16, 64, 512, 4096, 32760]
TYPES = ["Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def quant_linear_module(name: str, k: int, n: int, device: torch.device) -> nn.Linear:
    """A quant-aware ``nn.Linear(k, n)`` (no bias) whose weight is random ``name`` blocks."""
    qt = get_quant_type(name)
    with torch.device("meta"):
        lin = nn.Linear(k, n, bias=False)
    raw = random_blocks(name, n * k // qt.block_size, device).view(n, -1)
    lin._parameters["weight"] = nn.Parameter(GGMLTensor(raw, name, (n, k), torch.bfloat16),
                                             requires_grad=False)
    return swap_quant_layers(lin)


def bench_graph(fn) -> float:
    """Median ms of ``fn`` captured in a CUDA graph and replayed (no Python or launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay)


TUNE_SHAPES = [(5120, 5120), (13824, 5120)]


def tune(device: torch.device) -> dict:
    """Time fused-kernel launch rules for Q4_K (CUDA-graph replay: kernel time only).

    Installs the best rule per tile height as every fused type's ``tile_rules`` for this GPU's
    compute capability (``ggufvideo.kernels.settings.set_settings``) for the rest of the process
    and returns every timing.
    """
    import math
    from dataclasses import replace

    from ggufvideo.kernels import _matmul, settings

    # (BN, waves, num_warps, num_stages) per tile height: the CUDA-core branch (M=1) has no
    # tensor-core pipeline to feed, so stages only matter for the tl.dot branch.
    trials = {1: [(bn, w, nw, 1) for bn in (32, 64, 128) for w in (4, 8, 16) for nw in (2, 4)],
              16: [(bn, w, 4, ns) for bn in (64, 128) for w in (4, 8) for ns in (1, 3)],
              64: [(bn, w, 4, ns) for bn in (64, 128) for w in (2, 4) for ns in (1, 3)]}
    times: dict[tuple, float] = {}
    for k, n in TUNE_SHAPES:
        qt = get_quant_type("Q4_K")
        raw = random_blocks("Q4_K", n * k // qt.block_size, device).view(n, -1)
        for m in (1, 16, 64):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            current = settings.settings_for("Q4_K", device).tile_rule(_matmul.block_m(m))
            for rule in set(trials[m]) | {current}:
                t = bench_graph(lambda: _matmul.fused_linear(x, raw, "Q4_K", n, rule=rule))
                times[(k, n, m, rule)] = t * 1e3
            best = min(trials[m], key=lambda r: times[(k, n, m, r)])
            print(f"tune Q4_K K={k} N={n} M={m}: best {best} {times[(k, n, m, best)]:.1f} us; "
                  f"current {current} {times[(k, n, m, current)]:.1f} us", flush=True)
    chosen = {}
    for m in (1, 16, 64):
        def score(rule: tuple) -> float:
            rel = [times[(k, n, m, rule)] / min(times[(k, n, m, r)] for r in trials[m])
                   for k, n in TUNE_SHAPES]
            return math.exp(sum(map(math.log, rel)) / len(rel))
        chosen[m] = min(trials[m], key=score)
        print(f"tune: M={m} rule {chosen[m]} (geomean {score(chosen[m]):.3f}x of per-case best)",
              flush=True)
    tile_rules = ((1, chosen[1]), (16, chosen[16]), (32, chosen[64]), (64, chosen[64]))
    for name in _matmul.FUSED_TYPES:
        settings.set_settings(name, settings.capability_of(device),
                              replace(settings.settings_for(name, device), tile_rules=tile_rules))
    return dict(chosen=chosen, times={str(key): v for key, v in times.items()})


def bench_interleaved(cases: dict, rounds: int) -> dict:
    """Median ms of each of ``cases`` (name -> fn), run over ``rounds`` rounds whose order
    alternates (forward, then backward), so that no case always runs right after another."""
    times: dict = {key: [] for key in cases}
    for r in range(rounds):
        for key in list(cases)[::-1] if r % 2 else list(cases):
            times[key].append(bench(cases[key]))
    return {key: statistics.median(v) for key, v in times.items()}


def one_row(types: list[str], ms: tuple[int, ...] = (1,)) -> list[dict]:
    """M = 1 under CUDA graphs: the chunked kernel's one-row branch vs the GEMV/row kernel per rule.

    This is how ``_matmul.GEMV_STEPS`` and ``_matmul.ROW_STEPS`` (which types take which one-row
    kernel) and the sm_90 ``one_row_rule`` in ``ggufvideo.kernels.settings`` were chosen. Also checks every kernel against the float64
    exact-weight product on every shape. Other ``ms`` (up to ``_matmul.ROW_MAX_M``) time the row /
    GEMV kernels on that many activation rows against the default and the tensor-core path.
    """
    from ggufvideo.kernels import _matmul
    from ggufvideo.kernels.settings import settings_for
    from ggufvideo.quants import dequantize as torch_dequantize

    dev = torch.device("cuda")
    rules = [(32, 8, 4, 1), (64, 8, 4, 1), (128, 8, 4, 1)]
    # row kernel: (weight rows per program, waves, num_warps, num_stages)
    row_rules = [(4, 2, 4, 1), (2, 2, 2, 1), (8, 2, 8, 1), (2, 2, 1, 1), (8, 2, 4, 1)]
    rows = []
    for (k, n), m in itertools.product(SHAPES, ms):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
        base = bench_graph(lambda: F.linear(x, w))
        del w
        for name in types:
            qt = get_quant_type(name)
            raw = random_blocks(name, n * k // qt.block_size, dev).view(n, -1)
            ref = x.double() @ torch_dequantize(raw, name, dtype=torch.float32).double().T
            row = dict(type=name, k=k, n=n, m=m, bf16_us=base * 1e3)
            if m == 1:
                variants = {"chunked": dict(gemv=False, rule=settings_for(name, dev).tile_rule(1))}
            else:  # the default follows the settings' cuda_core_rows: CUDA-core kernels or tensor cores
                variants = {"default": {}, "tensor cores": dict(gemv=False)}
            if name in _matmul.GEMV_STEPS and m <= _matmul.ROW_MAX_M:
                variants |= {f"gemv {r}": dict(gemv=True, rule=r) for r in rules}
            if name in _matmul.ROW_STEPS and m <= _matmul.ROW_MAX_M:
                variants |= {f"rows {r}": dict(gemv=True, rule=r) for r in row_rules}
            for label, kw in variants.items():
                y = _matmul.fused_linear(x, raw, name, n, **kw)
                row[f"{label} err"] = ((y.double() - ref).norm() / ref.norm()).item()
                row[f"{label} us"] = bench_graph(lambda: _matmul.fused_linear(x, raw, name, n,
                                                                              **kw)) * 1e3
            rows.append(row)
            print(" ".join(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}"
                           for key, v in row.items()), flush=True)
    return rows


def run(types: list[str], ms: list[int], torch_path: bool = False) -> list[dict]:
    """Ratios of every (type, shape, M); also the bf16 and quant times in microseconds.

    The bf16 side multiplies by the same weight: the quant weight's decoded values. A GEMM's time
    depends on its data (power draw, then clocks): on an H100 at M = 32760 cuBLAS took 1.02-1.07x
    as long on the decoded random blocks as on the same values rescaled to ``randn / sqrt(K)``
    size (``experiments/gpu_gemm_data.py``). Large M runs the two sides over four rounds,
    in alternating order, and takes the medians (single runs drift by a few percent).
    """
    from ggufvideo import kernels
    from ggufvideo.quants import dequantize as torch_dequantize

    dev = torch.device("cuda")
    rows = []
    for k, n in SHAPES:
        x_all = torch.randn(max(ms), k, device=dev, dtype=torch.bfloat16)
        for name in types:
            lin = quant_linear_module(name, k, n, dev)
            w = torch_dequantize(lin.weight.raw, name, dtype=torch.bfloat16).view(n, k)
            with torch.no_grad():
                for m in ms:
                    x = x_all[:m]
                    med = bench_interleaved({"bf16": lambda: F.linear(x, w),
                                             "quant": lambda: lin(x)}, 4 if m >= 4096 else 1)
                    base, t = med["bf16"], med["quant"]
                    row = dict(type=name, k=k, n=n, m=m, bf16_us=base * 1e3, quant_us=t * 1e3,
                               ratio=t / base)
                    if m <= 64:  # launch-bound sizes: also the kernels' own time
                        base_graph = bench_graph(lambda: F.linear(x, w))
                        row["bf16_graph_us"] = base_graph * 1e3
                        row["graph_ratio"] = bench_graph(lambda: lin(x)) / base_graph
                        row["quant_graph_us"] = row["graph_ratio"] * base_graph * 1e3
                        if name in kernels.FUSED_TYPES:  # the other small-M path: decode + cuBLAS
                            kernels.set_fused_max_m(0)
                            try:
                                row["decode_ratio"] = bench(lambda: lin(x)) / base
                                row["decode_graph_ratio"] = bench_graph(lambda: lin(x)) / base_graph
                            finally:
                                kernels.set_fused_max_m(None)
                    if torch_path and m in (1, max(ms)):
                        kernels.set_enabled(False)
                        try:
                            row["torch_path_ratio"] = bench(lambda: lin(x), rep=50) / base
                        finally:
                            kernels.set_enabled(None)
                    rows.append(row)
            del lin, w
            kernels.release_workspace()
        print(f"# done K={k} N={n}", flush=True)
    return rows


def table(rows: list[dict], ms: list[int]) -> str:
    """Markdown: one line per (type, shape), one column per M."""
    head = ("| type | (K,N) | " + " | ".join(f"M={m}" for m in ms) + " |\n"
            "|---|---|" + "---|" * len(ms) + "\n")
    lines = []
    keys = []
    for r in rows:
        key = (r["type"], r["k"], r["n"])
        if key not in keys:
            keys.append(key)
    for t, k, n in keys:
        cells = {r["m"]: r["ratio"] for r in rows if (r["type"], r["k"], r["n"]) == (t, k, n)}
        lines.append(f"| {t} | {k},{n} | " + " | ".join(f"{cells[m]:.2f}" for m in ms) + " |")
    base: dict[tuple[int, int, int], list[float]] = {}
    for r in rows:
        base.setdefault((r["k"], r["n"], r["m"]), []).append(r["bf16_us"])
    bl = ["", "bf16 F.linear on the decoded weights, us (lowest-highest over the types):",
          "| (K,N) | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---|" * len(ms)]
    for k, n in SHAPES:
        if (k, n, ms[0]) in base:
            spans = [base[(k, n, m)] for m in ms]
            bl.append(f"| {k},{n} | " + " | ".join(
                f"{min(v):.1f}" if max(v) - min(v) < 0.05 else f"{min(v):.1f}-{max(v):.1f}"
                for v in spans) + " |")
    gr = [r for r in rows if "graph_ratio" in r]
    if gr:
        gms = sorted({r["m"] for r in gr})
        bl += ["", "Under CUDA graphs (kernel time only; both sides captured), ratio vs bf16:",
               "| type | (K,N) | " + " | ".join(f"M={m}" for m in gms) + " |",
               "|---|---|" + "---|" * len(gms)]
        for t, k, n in keys:
            cells = {r["m"]: r["graph_ratio"] for r in gr if (r["type"], r["k"], r["n"]) == (t, k, n)}
            bl.append(f"| {t} | {k},{n} | " + " | ".join(f"{cells[m]:.2f}" for m in gms) + " |")
    fr = [r for r in rows if "decode_ratio" in r]
    if fr:
        fms = sorted({r["m"] for r in fr})
        bl += ["", "Fused kernel off (decode into the workspace + cuBLAS; eager / CUDA graph), "
               "ratio vs bf16:",
               "| type | (K,N) | " + " | ".join(f"M={m}" for m in fms) + " |",
               "|---|---|" + "---|" * len(fms)]
        for t, k, n in keys:
            sel = {r["m"]: r for r in fr if (r["type"], r["k"], r["n"]) == (t, k, n)}
            if sel:
                bl.append(f"| {t} | {k},{n} | " + " | ".join(
                    f"{sel[m]['decode_ratio']:.2f} / {sel[m]['decode_graph_ratio']:.2f}" for m in fms)
                    + " |")
    tp = [r for r in rows if "torch_path_ratio" in r]
    extra = []
    if tp:
        extra = ["", "torch decode path (kernels off), ratio vs bf16:"]
        extra += [f"- {r['type']} K={r['k']} N={r['n']} M={r['m']}: {r['torch_path_ratio']:.2f}"
                  for r in tp]
    return head + "\n".join(lines + bl + extra)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--ms", nargs="*", type=int, default=MS)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--torch-path", action="store_true")
    ap.add_argument("--one-row", action="store_true",
                    help="only compare the one-row kernels (chunked vs GEMV / rows), M = 1")
    ap.add_argument("--one-row-ms", nargs="*", type=int, default=[1],
                    help="with --one-row: also these activation row counts (the row / GEMV "
                         "kernels' few-row mode against the default path)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    result: dict = {}
    if a.one_row:
        result["one_row"] = one_row(a.types, tuple(a.one_row_ms))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
        return
    if a.tune:
        result["tune"] = tune(torch.device("cuda"))
    result["rows"] = run(a.types, a.ms, a.torch_path)
    print(table(result["rows"], a.ms))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
