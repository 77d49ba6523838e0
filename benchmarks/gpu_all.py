"""One device lease: correctness of the GPU fast path, then the three GPU benchmarks.

Correctness (fresh random inputs every case, outputs poisoned with NaN before each kernel run):

* dequant: every Triton type x {float32, float16, bfloat16} x several block counts is compared
  bit for bit with the torch path (``ggufvideo.quants.dequantize`` on the same GPU), and float32
  additionally with gguf-py's numpy decoder (an exact ggml reference) on a sample;
* public wrappers: ``kernels.dequantize`` and ``ops.dequantize_weight`` on a CUDA ``GGMLTensor``
  give the torch path's bits;
* fused linear (M <= 64) against ``x @ W.T`` in float32 on the exactly decoded weight; the large-M
  path against ``F.linear`` on the torch-decoded weight (bit for bit: same weight, same GEMM);
* ``torch.compile(fullgraph=True)`` and CUDA-graph capture/replay of a quant-aware Linear.

Then ``gpu_dequant``, ``gpu_linear`` (optionally ``--tune``) and ``gpu_block``. Everything printed is
also written to ``--out`` (a folder) as ``results.json`` and ``summary.md``.

Run: ``python benchmarks/gpu_all.py --out $OUT [--stages env check dequant tune linear block]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_block  # noqa: E402
import gpu_dequant  # noqa: E402
import gpu_linear  # noqa: E402

from ggufvideo import GGMLTensor, kernels  # noqa: E402
from ggufvideo.quants import dequantize as torch_dequantize  # noqa: E402
from ggufvideo.quants import get_quant_type  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG: list[str] = []


def say(text: str) -> None:
    """Print and keep for summary.md."""
    print(text, flush=True)
    _LOG.append(text)


def random_blocks_wide(name: str, n_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks whose float16 fields span signs and magnitudes 1e-4 .. 1e1 (all finite)."""
    qt = get_quant_type(name)
    raw = torch.randint(0, 256, (n_blocks, qt.type_size()), dtype=torch.uint8, device="cuda",
                        generator=gen)
    for f in qt.layout.fields:
        if f.dtype == torch.float16:
            mag = 10.0 ** (torch.rand((n_blocks, f.count), device="cuda", generator=gen) * 5 - 4)
            sign = torch.randint(0, 2, (n_blocks, f.count), device="cuda", generator=gen) * 2 - 1
            raw[:, f.offset:f.offset + f.nbytes] = (mag * sign).to(torch.float16).view(torch.uint8)
    return raw


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def check_dequant(gen: torch.Generator, types: list[str] | None = None) -> dict:
    """Bit-exactness of every Triton dequant kernel; returns {type: failures}."""
    import gguf

    from ggufvideo.kernels._dequant import dequantize_into
    from ggufvideo.ops import dequantize_weight

    fails: dict[str, int] = {}
    for name in types or gpu_dequant.TYPES:
        qt = get_quant_type(name)
        bad = 0
        for n_blocks in (1, 3, 333, 40_001):
            for dtype in DTYPES:
                raw = random_blocks_wide(name, n_blocks, gen)
                out = torch.full((n_blocks * qt.block_size,), float("nan"), dtype=dtype,
                                 device="cuda")
                dequantize_into(raw, name, out)
                ref = torch_dequantize(raw, name, dtype=dtype).reshape(-1)
                if not torch.equal(_bits(out), _bits(ref)):
                    bad += 1
                    n_diff = (_bits(out) != _bits(ref)).sum().item()
                    say(f"  MISMATCH {name} {dtype} n_blocks={n_blocks}: {n_diff} elements differ")
                if dtype == torch.float32 and n_blocks == 333:
                    npref = gguf.quants.dequantize(raw.cpu().numpy().reshape(-1),
                                                   gguf.GGMLQuantizationType[name])
                    if not np.array_equal(out.cpu().numpy().view(np.int32),
                                          npref.astype(np.float32).view(np.int32)):
                        bad += 1
                        say(f"  MISMATCH vs gguf-py numpy: {name}")
        # Public wrappers and the ops hook on a 2-D GGMLTensor.
        raw = random_blocks_wide(name, 64 * 2048 // qt.block_size, gen).view(64, -1)
        w = GGMLTensor(raw, name, (64, 2048), torch.bfloat16)
        for dtype in DTYPES:
            ref = torch_dequantize(raw, name, dtype=dtype)
            a = kernels.dequantize(raw, name, (64, 2048), dtype)
            b = dequantize_weight(w, dtype)
            if not (torch.equal(_bits(a), _bits(ref)) and torch.equal(_bits(b), _bits(ref))):
                bad += 1
                say(f"  MISMATCH public wrapper {name} {dtype}")
        fails[name] = bad
        say(f"dequant {name}: {'ok' if bad == 0 else f'{bad} FAILED'}")
    return fails


def check_linear(gen: torch.Generator) -> dict:
    """Fused (M <= 64) and large-M linear against references; returns {case: error/flag}."""
    from ggufvideo.kernels._matmul import fused_linear

    res: dict[str, object] = {}
    for name in sorted(kernels.FUSED_TYPES):
        qt = get_quant_type(name)
        worst = {torch.bfloat16: 0.0, torch.float16: 0.0}
        for n, k in ((96, 512), (1000, 2048), (5120, 5120)):
            # Moderate scales (as real weights): wide random scales overflow float16 outputs.
            raw = gpu_dequant.random_blocks(name, n * k // qt.block_size, "cuda", gen).view(n, -1)
            # The fused kernel multiplies by the exact (float32) weights.
            w32 = torch_dequantize(raw, name, dtype=torch.float32)
            for dtype in (torch.bfloat16, torch.float16):
                w = torch_dequantize(raw, name, dtype=dtype)
                rules = (None,)  # the installed (tuned) rules: the kernels that production runs
                for m in (1, 7, 16, 33, 64):
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                    ref = x.float() @ w32.T
                    for rule in rules:
                        y = fused_linear(x, raw, name, n, rule=rule)
                        if not torch.isfinite(y).all():
                            res[f"{name} nonfinite n={n} k={k} m={m} {rule} {dtype}"] = True
                            say(f"  NONFINITE fused {name} n={n} k={k} m={m} {rule} {dtype}")
                        err = ((y.float() - ref).norm() / ref.norm()).item()
                        worst[dtype] = max(worst[dtype], err)
                # Large M: decode into the workspace + F.linear == F.linear on the torch decode.
                x = torch.randn(300, k, device="cuda", dtype=dtype, generator=gen)
                bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
                y = kernels.linear(x, raw, name, n, bias)
                if not torch.equal(y, F.linear(x, w, bias)):
                    say(f"  MISMATCH large-M {name} n={n} k={k} {dtype}")
                    res[f"{name} large-M n={n} {dtype}"] = "mismatch"
        res[f"{name} fused worst rel err"] = {str(d): e for d, e in worst.items()}
        say(f"linear {name}: fused worst relative error bf16 {worst[torch.bfloat16]:.2e}, "
            f"fp16 {worst[torch.float16]:.2e} (output rounding alone: ~2e-3 / ~3e-4)")
    return res


def check_compile_and_graphs(gen: torch.Generator) -> dict:
    """A quant-aware Linear under torch.compile(fullgraph=True) and CUDA graph replay."""
    res: dict[str, object] = {}
    lin = gpu_linear.quant_linear_module("Q4_K", 5120, 5120, torch.device("cuda"))
    for m in (4, 300):
        x = torch.randn(m, 5120, device="cuda", dtype=torch.bfloat16, generator=gen)
        with torch.no_grad():
            eager = lin(x)
            try:
                compiled = torch.compile(lin, fullgraph=True)
                res[f"compile M={m}"] = torch.equal(compiled(x), eager)
            except Exception as e:  # noqa: BLE001
                res[f"compile M={m}"] = f"{type(e).__name__}: {e}"[:300]
            try:
                static_x = x.clone()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        lin(static_x)
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static_y = lin(static_x)
                x2 = torch.randn(m, 5120, device="cuda", dtype=torch.bfloat16, generator=gen)
                static_x.copy_(x2)
                g.replay()
                torch.cuda.synchronize()
                res[f"cuda graph M={m}"] = torch.equal(static_y, lin(x2))
            except Exception as e:  # noqa: BLE001
                res[f"cuda graph M={m}"] = f"{type(e).__name__}: {e}"[:300]
    for key, v in res.items():
        say(f"{key}: {v}")
    return res


def env() -> dict:
    """Versions and the device."""
    import triton

    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0),
                sms=torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as e:  # noqa: BLE001
        info["diffusers"] = f"absent ({type(e).__name__})"
    say("env: " + json.dumps(info))
    return info


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--stages", nargs="*",
                    default=["env", "check", "dequant", "tune", "linear", "block"])
    ap.add_argument("--linear-types", nargs="*", default=gpu_linear.TYPES)
    ap.add_argument("--block-count", type=int, default=2)
    ap.add_argument("--check-what", nargs="*", default=["dequant", "linear", "graphs"])
    ap.add_argument("--check-types", nargs="*", help="dequant types to check (default: all)")
    ap.add_argument("--linear-ms", nargs="*", type=int, default=gpu_linear.MS)
    ap.add_argument("--torch-path", action="store_true", help="linear: also time the torch path")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time()))  # fresh inputs every run; the seed is recorded
    results: dict = {"seed": gen.initial_seed(), "command": " ".join(sys.argv)}

    def stage(key: str, fn) -> None:  # noqa: ANN001
        if key not in a.stages:
            return
        t = time.time()
        try:
            results[key] = fn()
        except Exception:  # noqa: BLE001 - keep going: one lease, several stages
            results[key] = "error: " + traceback.format_exc()[-2000:]
            say(f"STAGE {key} FAILED:\n{traceback.format_exc()[-3000:]}")
        say(f"# stage {key}: {time.time() - t:.0f} s")
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(a.out, "summary.md"), "w") as f:
            f.write("\n".join(_LOG) + "\n")

    stage("env", env)

    def dequant() -> dict:
        out = {}
        for dname in ("bf16", "fp32"):
            rows = gpu_dequant.run(gpu_dequant.DTYPES[dname])
            say(gpu_dequant.table(rows, dname, (13824, 5120)))
            out[dname] = rows
        return out

    stage("dequant", dequant)
    stage("tune", lambda: gpu_linear.tune(torch.device("cuda")))
    # After tuning, so the fused kernels checked are the ones the linear benchmark runs.
    checks = {"dequant": lambda: check_dequant(gen, a.check_types),
              "linear": lambda: check_linear(gen), "graphs": lambda: check_compile_and_graphs(gen)}
    stage("check", lambda: {key: checks[key]() for key in a.check_what})

    def linear() -> list:
        rows = gpu_linear.run(a.linear_types, a.linear_ms, torch_path=a.torch_path)
        say(gpu_linear.table(rows, a.linear_ms))
        return rows

    stage("linear", linear)

    def block() -> dict:
        res = gpu_block.run(a.block_count, 32760)
        say(gpu_block.table(res))
        return res

    stage("block", block)


if __name__ == "__main__":
    main()
