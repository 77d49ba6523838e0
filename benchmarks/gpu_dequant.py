"""GPU dequantization throughput: Triton kernels vs a device copy, our torch path and diffusers'.

For a Wan-14B FFN weight [13824 x 5120] of each type, decoded to bf16 (``--dtype``):

* achieved GB/s of the Triton kernel, counting bytes read (blocks) plus bytes written (output),
  and that as a share of a device-to-device copy measured in the same run;
* speedup over our torch path (``ggufvideo.quants.dequantize`` on the GPU);
* speedup over diffusers' torch dequant (``dequantize_functions`` of diffusers.quantizers.gguf),
  when diffusers is importable.

Times are medians of ``triton.testing.do_bench`` (CUDA events; L2 flushed between runs).
Run: ``python benchmarks/gpu_dequant.py [--dtype bf16] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ggufvideo.quants import dequantize as torch_dequantize
from ggufvideo.quants import get_quant_type

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_blocks(qtype: str, n_blocks: int, device: torch.device | str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``(n_blocks, type_size)`` blocks whose float16 fields are finite, small, positive.

    Every other byte is uniform, so every code, scale and bit pattern occurs.
    """
    qt = get_quant_type(qtype)
    raw = torch.randint(0, 256, (n_blocks, qt.type_size()), dtype=torch.uint8, device=device,
                        generator=generator)
    for f in qt.layout.fields:
        if f.dtype == torch.float16:
            vals = torch.rand((n_blocks, f.count), device=device, generator=generator) * 1e-2 + 1e-4
            raw[:, f.offset:f.offset + f.nbytes] = vals.to(torch.float16).view(torch.uint8)
    return raw


def bench(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """GB/s of a device-to-device copy of ``nbytes``, counting read + written bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def pinned_h2d_bandwidth(dst: torch.Tensor) -> float:
    """GB/s of a host-to-device copy into the uint8 device tensor ``dst`` from pinned memory of
    the same size (one ``copy_``, best of three): the baseline the staged loads are held to."""
    src = torch.empty(dst.numel(), dtype=torch.uint8).pin_memory()
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, dst.numel() / (time.perf_counter() - t0) / 1e9)
    return best


def diffusers_dequant():
    """diffusers' per-type torch dequant functions, or ``None`` if diffusers is not importable."""
    try:
        from diffusers.quantizers.gguf.utils import dequantize_functions
    except Exception as e:  # noqa: BLE001 - any import failure just skips the comparison
        print(f"# diffusers not usable: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return dequantize_functions


def run(dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int] = (13824, 5120),
        types: list[str] | None = None) -> list[dict]:
    """Measure every type; returns one dict per type (times in microseconds)."""
    from gguf import GGMLQuantizationType

    from ggufvideo.kernels._dequant import dequantize_into

    dev = torch.device("cuda")
    n = shape[0] * shape[1]
    out_bytes = n * torch.empty(0, dtype=dtype).element_size()
    copy_gbs = copy_bandwidth(256 << 20, dev)
    peer = diffusers_dequant()
    rows = []
    for name in types or TYPES:
        qt = get_quant_type(name)
        raw = random_blocks(name, n // qt.block_size, dev)
        out = torch.empty(n, dtype=dtype, device=dev)
        t_triton = bench(lambda: dequantize_into(raw, name, out))
        t_torch = bench(lambda: torch_dequantize(raw, name, dtype=dtype), rep=50)
        t_peer = None
        q = GGMLQuantizationType[name]
        if peer is not None and q in peer:
            fn = peer[q]
            t_peer = bench(lambda: fn(raw, qt.block_size, qt.type_size(), dtype).to(dtype), rep=50)
        total = raw.numel() + out_bytes
        gbs = total / t_triton / 1e6
        rows.append(dict(type=name, bytes_read=raw.numel(), bytes_written=out_bytes,
                         triton_us=t_triton * 1e3, gbs=gbs, copy_gbs=copy_gbs,
                         pct_copy=100 * gbs / copy_gbs, torch_us=t_torch * 1e3,
                         x_torch=t_torch / t_triton,
                         diffusers_us=None if t_peer is None else t_peer * 1e3,
                         x_diffusers=None if t_peer is None else t_peer / t_triton))
    return rows


def table(rows: list[dict], dtype_name: str, shape: tuple[int, int]) -> str:
    """Markdown table of :func:`run`'s rows."""
    head = (f"dequant [{shape[0]}x{shape[1]}] -> {dtype_name}; copy {rows[0]['copy_gbs']:.0f} GB/s\n"
            "| type | Triton us | GB/s | % of copy | torch path us | x torch | diffusers us | x diffusers |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        peer = ("n/a", "n/a") if r["diffusers_us"] is None else (f"{r['diffusers_us']:.0f}",
                                                                 f"{r['x_diffusers']:.1f}")
        lines.append(f"| {r['type']} | {r['triton_us']:.1f} | {r['gbs']:.0f} | {r['pct_copy']:.0f}% "
                     f"| {r['torch_us']:.0f} | {r['x_torch']:.1f} | {peer[0]} | {peer[1]} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--types", nargs="*")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    shape = (13824, 5120)
    rows = run(DTYPES[a.dtype], shape, a.types)
    print(table(rows, a.dtype, shape))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
