"""Memory of a Wan-2.1-1.3B-shaped transformer loaded from GGUF: lazy (quantized) vs eager.

Builds diffusers' ``WanTransformer3DModel`` with Wan 2.1 1.3B's real shapes (dim 1536, ffn 8960,
30 layers, 12 heads, text dim 4096, patch embedding [1536, 16, 1, 2, 2], as in the released
checkpoint's config),
writes a GGUF file of random weights, then in a fresh process per mode loads it with
``ggufvideo.load_model`` into a model built under ``empty_weights()`` and runs one small forward
pass (which touches every weight). It prints the process's peak RSS above its baseline (after
imports) for each mode, and the ratios to the file's tensor bytes.

Random weights: quantizing 1.4B values with a K-quant in torch takes a while, so every quantized
tensor is filled with blocks drawn from a pool of genuinely quantized normal values (one pool per
type, ggufvideo's own quantizer); 1-D tensors are F32, as converters keep them. Memory does not
depend on the values.

Usage::

    python benchmarks/model_memory.py                  # Q4_K, bfloat16 compute, 30 layers
    python benchmarks/model_memory.py --qtype Q8_0 --layers 8 --keep /tmp/wan.gguf

Needs diffusers. Timings printed alongside are wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _config(layers: int) -> dict:
    return {**WAN_1_3B, "num_layers": layers}


def write_file(path: str, qtype_name: str, layers: int, seed: int = 0) -> int:
    """Write the random-weight GGUF file; returns its tensor bytes."""
    import gguf
    import numpy as np
    import torch
    from diffusers import WanTransformer3DModel

    from ggufvideo import empty_weights, quantize
    from ggufvideo.quants import get_quant_type

    with empty_weights():
        model = WanTransformer3DModel(**_config(layers))
    qt = get_quant_type(qtype_name)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    pool_elems = 1 << 18
    pool = quantize((torch.randn(pool_elems // 256, 256, generator=g) * 0.02), qt.qtype)
    pool = pool.reshape(-1, qt.type_size()).numpy()
    writer = gguf.GGUFWriter(path, "wan")
    total = 0
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        n = p.numel()
        if p.dim() < 2 or n % 256:
            arr = rng.standard_normal(shape, dtype=np.float32) * 0.02 + (1.0 if "norm" in name else 0.0)
            writer.add_tensor(name, arr)
            total += arr.nbytes
            continue
        n_blocks = n // qt.block_size
        picks = rng.integers(0, pool.shape[0], n_blocks)
        if shape[-1] % qt.block_size == 0:
            blocks = pool[picks].reshape(*shape[:-1], -1)
        else:  # a 1x2x2 patch kernel: stored flattened, ComfyUI-GGUF's convention
            blocks = pool[picks].reshape(n // 256, -1)
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qt.qtype)
        total += blocks.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def child(mode: str, path: str, dtype_name: str, layers: int) -> dict:
    """One measurement, in a fresh process: load, run a forward, report RSS."""
    import torch
    from diffusers import WanTransformer3DModel

    from ggufvideo import empty_weights, load_model
    from ggufvideo.model import parameter_bytes

    torch.set_grad_enabled(False)
    dtype = getattr(torch, dtype_name)
    baseline = _status_kib("VmRSS")
    with empty_weights():
        model = WanTransformer3DModel(**_config(layers)).eval()
    t0 = time.perf_counter()
    load_model(model, path, lazy=(mode == "lazy"), dtype=dtype)
    load_s = time.perf_counter() - t0
    after_load = _status_kib("VmRSS")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 8, generator=g).to(dtype)
    ctx = torch.randn(1, 16, 4096, generator=g).to(dtype)
    t0 = time.perf_counter()
    out = model(x, torch.tensor([500]), ctx, return_dict=False)[0]
    forward_s = time.perf_counter() - t0
    return {"mode": mode, "baseline_kib": baseline, "after_load_kib": after_load,
            "after_forward_kib": _status_kib("VmRSS"), "peak_kib": _status_kib("VmHWM"),
            "parameter_bytes": parameter_bytes(model), "load_s": load_s, "forward_s": forward_s,
            "finite": bool(torch.isfinite(out).all())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--keep", metavar="PATH", help="write the file here and keep it")
    ap.add_argument("--child", choices=["lazy", "eager"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.file, args.dtype, args.layers)))
        return

    tmp = None
    if args.keep:
        path = args.keep
    else:
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "wan-1.3b.gguf")
    try:
        t0 = time.perf_counter()
        tensor_bytes = write_file(path, args.qtype, args.layers)
        print(f"wrote {path}: {os.path.getsize(path) / 2**30:.3f} GiB file, "
              f"{tensor_bytes / 2**30:.3f} GiB of tensors ({args.qtype}, {args.layers} layers) "
              f"in {time.perf_counter() - t0:.0f} s")
        results = []
        for mode in ("lazy", "eager"):
            cmd = [sys.executable, __file__, "--child", mode, "--file", path, "--dtype", args.dtype,
                   "--layers", str(args.layers)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
        gib = 2**20  # KiB per GiB
        print(f"\n{'mode':6} {'peak RSS - baseline':>20} {'x file':>7} {'params held':>12} "
              f"{'x file':>7} {'load s':>7} {'fwd s':>7}")
        for r in results:
            peak = r["peak_kib"] - r["baseline_kib"]
            print(f"{r['mode']:6} {peak / gib:>16.3f} GiB {peak * 1024 / tensor_bytes:>7.2f} "
                  f"{r['parameter_bytes'] / 2**30:>8.3f} GiB "
                  f"{r['parameter_bytes'] / tensor_bytes:>7.2f} {r['load_s']:>7.1f} "
                  f"{r['forward_s']:>7.1f}")
        lazy, eager = results
        ratio = (eager["peak_kib"] - eager["baseline_kib"]) / (lazy["peak_kib"] - lazy["baseline_kib"])
        print(f"\neager/lazy peak RSS: {ratio:.2f}x  (compute dtype {args.dtype}; baseline RSS after "
              f"imports {lazy['baseline_kib'] / gib:.2f} GiB; outputs finite: "
              f"{lazy['finite'] and eager['finite']})")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
