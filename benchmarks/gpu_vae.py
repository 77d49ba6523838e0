"""Wan VAE memory: decoding 81 frames at 480x832 with diffusers' tiling, quantized vs bf16.

``AutoencoderKLWan()`` at its default config (the Wan 2.1 VAE's real shapes) with random weights:
every Conv3d weight with at least 1024 elements (a multiple of 256: stored flattened) holds random
``--types`` blocks (a ``GGMLTensor``, ggufvideo's quant-aware Conv3d), the rest bf16; the bf16
model is the same architecture with plain bf16 weights. Latents ``1x16x21x60x104`` (81 frames
at 480x832) are decoded with ``enable_tiling()`` (diffusers' default tiles), and without tiling
where ``--untiled`` is given. Printed side by side: peak GPU memory (``max_memory_allocated``,
weights included), weight bytes, median decode time.

Run: ``python benchmarks/gpu_vae.py --types Q8_0 Q4_K --reps 2 --out DIR`` (add ``--untiled`` to
also decode without tiling; that needs tens of GiB). One JSON line per variant, also written to
``DIR/vae_decode.jsonl``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_dequant import random_blocks  # noqa: E402

from ggufvideo import GGMLTensor  # noqa: E402
from ggufvideo.ops import swap_quant_layers  # noqa: E402
from ggufvideo.quants import get_quant_type  # noqa: E402

LATENTS = (1, 16, 21, 60, 104)  # 81 frames, 480x832


def build(qtype: str | None) -> nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if qtype is not None:
        qt = get_quant_type(qtype)
        for m in vae.modules():
            w = getattr(m, "weight", None)
            if not isinstance(m, nn.Conv3d) or w is None or w.numel() < 1024:
                continue
            if w.numel() % 256:  # stored flattened, 256 elements a row (as the writer does)
                continue
            raw = random_blocks(qtype, w.numel() // qt.block_size, "cuda", gen)
            m.weight = nn.Parameter(GGMLTensor(raw.view(w.numel() // 256, -1), qtype, w.shape,
                                               torch.bfloat16), requires_grad=False)
        swap_quant_layers(vae)
    return vae.to("cuda")


def weight_bytes(model: nn.Module) -> int:
    return sum(t.raw.nbytes if isinstance(t, GGMLTensor) else t.nbytes
               for t in [*model.parameters(), *model.buffers()])


def decode(vae: nn.Module, z: torch.Tensor, reps: int) -> tuple[float, int, torch.Tensor]:
    times = []
    out = None
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = vae.decode(z).sample
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    times.sort()
    assert out is not None
    return times[len(times) // 2], torch.cuda.max_memory_allocated(), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", nargs="*", default=["Q8_0", "Q4_K"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--untiled", action="store_true", help="also decode without tiling")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "vae_decode.jsonl")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}),
          flush=True)
    z = torch.randn(LATENTS, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1),
                    dtype=torch.bfloat16)
    rows = []
    for qtype in [None, *args.types]:
        vae = build(qtype)
        for tiled in ([True, False] if args.untiled else [True]):
            vae.disable_tiling()
            if tiled:
                vae.enable_tiling()
            gc.collect()
            torch.cuda.empty_cache()
            row = {"variant": qtype or "bf16", "tiling": tiled,
                   "weight_mib": round(weight_bytes(vae) / 2**20, 1),
                   "quantized_convs": sum(isinstance(m.weight, GGMLTensor) for m in vae.modules()
                                          if isinstance(m, nn.Conv3d))}
            try:
                s, peak, out = decode(vae, z, args.reps)
                row.update(decode_s=round(s, 2), peak_gib=round(peak / 2**30, 2),
                           out_shape=list(out.shape), finite=bool(torch.isfinite(out).all()))
                del out
            except torch.cuda.OutOfMemoryError as e:
                row.update(error=f"OOM: {str(e)[:200]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        del vae
    print("\nvariant  tiling  weights MiB  peak GiB  decode s")
    for r in rows:
        print(f"{r['variant']:7s}  {str(r['tiling']):6s}  {r['weight_mib']:11.1f}  "
              f"{r.get('peak_gib', float('nan')):8.2f}  {r.get('decode_s', float('nan')):8.2f}")


if __name__ == "__main__":
    main()
