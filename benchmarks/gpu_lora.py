"""LoRA on Q4_K Wan-14B shapes at 32,760 tokens: ours (unmerged, fused) vs decode+merge per call vs
peft's adapters vs no LoRA -- per linear layer and for a stack of diffusers ``WanTransformerBlock``s.

Variants (each on the same Q4_K base weights, bf16 activations, CUDA-event medians):
  * ``none``: no LoRA (our quant-aware layers, decode into the workspace + cuBLAS).
  * ``ours``: :func:`ggufvideo.apply_lora`-style adapters, fused path: the base product as without
    a LoRA, one GEMM for ``down @ x`` of all the layer's LoRAs (packed into one pair), and a
    Triton kernel that adds ``(scale * up) @ h`` into the output in place (``ours, cuBLAS up``:
    the same with cuBLAS' ``addmm_`` for the last step).
  * ``ours-unfused``: the same adapters on the reference path (base GEMM + two small GEMMs + add).
  * ``merge``: what ComfyUI-GGUF does: decode to float32, add ``s * up @ down``, cast, ``F.linear``.
  * ``peft``: peft's ``LoraLayer`` wrapping our quant-aware layer (``inject_adapter_in_model``).

Also checks: with the LoRA's scale at 0 the fused output equals the no-LoRA output bit for bit
(the base product is unchanged), and fused vs reference-path outputs agree.

Run: ``python benchmarks/gpu_lora.py [--blocks 2] [--tokens 32760] [--json out.json]``; on CPU
(``--cpu``) the same ratios at small shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ggufvideo import GGMLTensor  # noqa: E402
from ggufvideo import kernels as ggv_kernels  # noqa: E402
from ggufvideo.ops import (  # noqa: E402
    LoraAdapter,
    QuantLinear,
    dequantize_weight,
    lora_adapters,
    set_lora_fusion,
    swap_quant_layers,
)
from ggufvideo.quants import get_quant_type, quantize  # noqa: E402

DIM, FFN, HEADS, TEXT = 5120, 13824, 40, 512


def random_q(n: int, k: int, qtype: str, device: torch.device) -> GGMLTensor:
    if device.type == "cuda":
        from gpu_dequant import random_blocks

        qt = get_quant_type(qtype)
        raw = random_blocks(qtype, n * k // qt.block_size, device).view(n, -1)
    else:
        raw = quantize(torch.randn(n, k) * 0.02, qtype)
    return GGMLTensor(raw, qtype, (n, k), torch.bfloat16)


def add_loras(model: nn.Module, rank: int, count: int, device: torch.device) -> list:
    """``count`` rank-``rank`` adapters on every quant-aware linear; returns (layer, adapter)s."""
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for _ in range(count):
                a = LoraAdapter(up=torch.randn(m.out_features, rank, device=device, generator=g,
                                               dtype=torch.bfloat16) * 0.01,
                                down=torch.randn(rank, m.in_features, device=device, generator=g,
                                                 dtype=torch.bfloat16) * 0.01, scale=0.7)
                lora_adapters(m).append(a)
                out.append((m, a))
    return out


def clear_loras(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.__dict__.pop("lora_adapters", None)
            m.__dict__.pop("_lora_pack", None)
            m.__dict__.pop("forward", None)


def merge_per_call(model: nn.Module, rank: int, count: int, device: torch.device) -> None:
    """ComfyUI-GGUF's way: decode, add the patch in float32, cast, F.linear -- on every call."""
    pairs = add_loras(model, rank, count, device)
    by_layer: dict[nn.Module, list] = {}
    for m, a in pairs:
        by_layer.setdefault(m, []).append(a)
    for m, adapters in by_layer.items():
        m.__dict__.pop("lora_adapters")

        def forward(x, m=m, adapters=adapters):  # noqa: ANN001, ANN202
            w = dequantize_weight(m.weight, torch.float32)
            for a in adapters:
                w = w + a.scale * (a.up.float() @ a.down.float())
            b = None if m.bias is None else dequantize_weight(m.bias, x.dtype)
            return F.linear(x, w.to(x.dtype), b)

        m.forward = forward


def with_peft(model: nn.Module, rank: int, names: list[str]) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights=False)
    model = peft.inject_adapter_in_model(cfg, model)
    return model.to(torch.bfloat16)


@contextlib.contextmanager
def cublas_up() -> Iterator[None]:
    """The fused path with the up-projection added by cuBLAS' ``addmm_`` (not the Triton kernel):
    no rank is small enough for the kernel."""
    saved = ggv_kernels.LORA_MAX_RANK
    ggv_kernels.LORA_MAX_RANK = 0
    try:
        yield
    finally:
        ggv_kernels.LORA_MAX_RANK = saved


def timed(fn, reps: int, sync) -> float:  # noqa: ANN001
    fn()
    sync()
    fn()
    sync()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# -- per layer -------------------------------------------------------------------------------------
def layer_bench(device: torch.device, tokens: int, shapes: list[tuple[int, int]], qtype: str,
                reps: int) -> list[dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for k, n in shapes:
        # One function call per shape: its layer and input are freed before the next shape's.
        rows.extend(_layer_rows(device, tokens, k, n, qtype, reps, sync))
    return rows


def _layer_rows(device: torch.device, tokens: int, k: int, n: int, qtype: str, reps: int,
                sync) -> list[dict]:  # noqa: ANN001
    rows = []
    lin = nn.Linear(k, n, bias=True, device="meta")
    lin.weight = nn.Parameter(random_q(n, k, qtype, device), requires_grad=False)
    lin.bias = nn.Parameter(torch.zeros(n, device=device, dtype=torch.bfloat16),
                            requires_grad=False)
    swap_quant_layers(lin)
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        base = timed(lambda: lin(x), reps, sync)
        y0 = lin(x)
        for rank, count in ((32, 1), (128, 1), (32, 3)):
            res = {"K": k, "N": n, "rank": rank, "loras": count, "none_ms": base}
            pairs = add_loras(lin, rank, count, device)
            set_lora_fusion(True)
            res["ours_ms"] = timed(lambda: lin(x), reps, sync)
            yf = lin(x)
            with cublas_up():
                res["ours_cublas_up_ms"] = timed(lambda: lin(x), reps, sync)
            set_lora_fusion(False)
            res["ours_unfused_ms"] = timed(lambda: lin(x), reps, sync)
            yr = lin(x)
            set_lora_fusion(True)
            res["fused_vs_reference_max_abs"] = float((yf.float() - yr.float()).abs().max())
            for _, a in pairs:
                a.scale = 0.0
            res["base_bit_identical_at_scale_0"] = bool(torch.equal(lin(x), y0))
            clear_loras(lin)
            merge_per_call(lin, rank, count, device)
            res["merge_ms"] = timed(lambda: lin(x), reps, sync)
            clear_loras(lin)
            if count == 1:
                try:
                    wrapper = nn.Sequential(lin)
                    wrapped = with_peft(wrapper, rank, ["0"])
                    res["peft_ms"] = timed(lambda: wrapped(x), reps, sync)
                    lin = wrapped[0].base_layer
                except Exception as exc:  # noqa: BLE001
                    res["peft_error"] = repr(exc)[:200]
            rows.append(res)
            print(json.dumps(res), flush=True)
    return rows


# -- a stack of Wan blocks ---------------------------------------------------------------------------
def block_bench(device: torch.device, n_blocks: int, tokens: int, qtype: str, reps: int,
                dim: int = DIM, ffn: int = FFN, heads: int = HEADS) -> dict:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def build() -> nn.ModuleList:
        with torch.device("meta"):
            blocks = nn.ModuleList(WanTransformerBlock(dim, ffn, heads, qk_norm="rms_norm_across_heads",
                                                       cross_attn_norm=True, eps=1e-6)
                                   for _ in range(n_blocks))
        blocks = blocks.to_empty(device=device).to(torch.bfloat16)
        for p in blocks.parameters():
            p.data.normal_(0, 0.02)
        for m in blocks.modules():
            if isinstance(m, nn.Linear):
                n, k = m.weight.shape
                m._parameters["weight"] = nn.Parameter(random_q(n, k, qtype, device),
                                                       requires_grad=False)
        return swap_quant_layers(blocks)

    blocks = build()
    x = torch.randn(1, tokens, dim, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, TEXT, dim, device=device, dtype=torch.bfloat16)
    temb = torch.randn(1, 6, dim, device=device, dtype=torch.float32) * 0.1
    rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 1024).to(device)
    frames = max(1, tokens // (30 * 52))
    cos, sin = rope(torch.empty(1, 16, frames, 60, 104, device=device))
    rotary = (cos[:, :tokens], sin[:, :tokens])

    def fwd(mods: nn.Module):  # noqa: ANN202
        def run():  # noqa: ANN202
            h = x
            for b in mods:
                h = b(h, text, temb, rotary)
            return h
        return run

    res: dict = {"blocks": n_blocks, "tokens": tokens, "qtype": qtype}
    with torch.no_grad():
        res["none_ms"] = timed(fwd(blocks), reps, sync)
        for rank, count in ((32, 1), (128, 1), (32, 3)):
            tag = f"r{rank}x{count}"
            add_loras(blocks, rank, count, device)
            set_lora_fusion(True)
            res[f"ours_{tag}_ms"] = timed(fwd(blocks), reps, sync)
            with cublas_up():
                res[f"ours_cublas_up_{tag}_ms"] = timed(fwd(blocks), reps, sync)
            set_lora_fusion(False)
            res[f"ours_unfused_{tag}_ms"] = timed(fwd(blocks), reps, sync)
            set_lora_fusion(True)
            clear_loras(blocks)
            merge_per_call(blocks, rank, count, device)
            res[f"merge_{tag}_ms"] = timed(fwd(blocks), reps, sync)
            clear_loras(blocks)
            print(json.dumps(res), flush=True)
        for rank in (32, 128):
            try:
                # full module names: a short suffix such as "2" (of ffn.net.2) would also match
                # the block "2" itself, which peft refuses to wrap
                names = [n for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
                peft_blocks = with_peft(build(), rank, names)
                res[f"peft_r{rank}x1_ms"] = timed(fwd(peft_blocks), reps, sync)
                del peft_blocks
            except Exception as exc:  # noqa: BLE001
                res["peft_error"] = repr(exc)[:300]
            print(json.dumps(res), flush=True)
    return res


def table(layers: list[dict], block: dict | None) -> str:
    lines = ["per layer (time ratio vs no LoRA; ms of no LoRA):",
             "| K x N | rank x LoRAs | none ms | ours | ours, cuBLAS up | ours unfused | merge per call | "
             "peft | base bit-identical | fused-ref max|d| |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        b = r["none_ms"]
        peft = f"{r['peft_ms'] / b:.3f}" if "peft_ms" in r else "-"
        lines.append(f"| {r['K']}x{r['N']} | {r['rank']}x{r['loras']} | {b:.2f} | "
                     f"{r['ours_ms'] / b:.3f} | {r['ours_cublas_up_ms'] / b:.3f} | "
                     f"{r['ours_unfused_ms'] / b:.3f} | "
                     f"{r['merge_ms'] / b:.3f} | {peft} | {r['base_bit_identical_at_scale_0']} | "
                     f"{r['fused_vs_reference_max_abs']:.3g} |")
    if block:
        b = block["none_ms"]
        lines += ["", f"{block['blocks']} diffusers WanTransformerBlock(s), {block['tokens']} tokens, "
                  f"{block['qtype']} (no LoRA: {b:.1f} ms):",
                  "| LoRA | ours | ours, cuBLAS up | ours unfused | merge per call | peft |",
                  "|---|---|---|---|---|---|"]
        for tag in ("r32x1", "r128x1", "r32x3"):
            def ratio(key: str) -> str:
                return f"{block[key] / b:.3f}" if key in block else "-"
            lines.append(f"| {tag} | {ratio(f'ours_{tag}_ms')} | {ratio(f'ours_cublas_up_{tag}_ms')} | "
                         f"{ratio(f'ours_unfused_{tag}_ms')} | "
                         f"{ratio(f'merge_{tag}_ms')} | {ratio(f'peft_{tag}_ms')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--qtype", default="Q4_K")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="small shapes on the CPU")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.cpu:
        dev = torch.device("cpu")
        layers = [] if a.skip_layers else layer_bench(dev, 512, [(512, 512), (512, 1536)], a.qtype,
                                                      a.reps)
        block = block_bench(dev, a.blocks, 256, a.qtype, a.reps, dim=512, ffn=1536, heads=4)
    else:
        dev = torch.device("cuda")
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
        layers = [] if a.skip_layers else layer_bench(
            dev, a.tokens, [(DIM, DIM), (DIM, FFN), (FFN, DIM)], a.qtype, a.reps)
        block = block_bench(dev, a.blocks, a.tokens, a.qtype, a.reps)
    print(table(layers, block))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"layers": layers, "block": block}, fh, indent=1)


if __name__ == "__main__":
    main()
