"""A stack of Wan-14B-shaped transformer blocks at 32,760 tokens: bf16 vs lazy quantized weights.

Each block is diffusers' ``WanTransformerBlock`` (dim 5120, FFN 13824, 40 heads) when diffusers is
importable, else a plain block of the same shapes (self-attention, cross-attention, GELU FFN) built
here. Random weights. Variants: bf16; the ten linear weights per block kept as random Q8_0 / Q4_K
blocks (``GGMLTensor``, decoded on the fly by the quant-aware layers: "lazy"); and Q4_K with the
Triton path switched off (the torch decode path) for reference.

Reported per variant: forward time of the stack (median, CUDA events), peak allocated memory during
the forward, and the memory budget the issue sets for the quantized variants:
quantized weight bytes + 1.2 x the largest dequantized layer + activations, with activations taken
as the bf16 variant's peak minus its weight bytes.

Run: ``python benchmarks/gpu_block.py [--blocks 2] [--tokens 32760] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_dequant import random_blocks  # noqa: E402

from ggufvideo import GGMLTensor  # noqa: E402
from ggufvideo.ops import swap_quant_layers  # noqa: E402
from ggufvideo.quants import get_quant_type  # noqa: E402

DIM, FFN, HEADS, TEXT = 5120, 13824, 40, 512


class PlainWanBlock(nn.Module):
    """Wan-shaped block without diffusers: modulated self-attn, cross-attn, GELU FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.cq, self.ck, self.cv, self.co = (nn.Linear(DIM, DIM) for _ in range(4))
        self.up = nn.Linear(DIM, FFN)
        self.down = nn.Linear(FFN, DIM)
        self.n1 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.n2 = nn.LayerNorm(DIM)
        self.n3 = nn.LayerNorm(DIM, elementwise_affine=False)
        self.table = nn.Parameter(torch.randn(1, 6, DIM) / DIM ** 0.5)

    def _attn(self, x: torch.Tensor, ctx: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear,
              o: nn.Linear) -> torch.Tensor:
        b, s, _ = x.shape
        heads = (lambda t: t.view(b, -1, HEADS, DIM // HEADS).transpose(1, 2))
        y = F.scaled_dot_product_attention(heads(q(x)), heads(k(ctx)), heads(v(ctx)))
        return o(y.transpose(1, 2).reshape(b, s, DIM))

    def forward(self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                rotary: object = None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = (self.table + temb.float()).chunk(6, dim=1)
        h = (self.n1(x.float()) * (1 + sc1) + sh1).type_as(x)
        x = x + self._attn(h, h, self.q, self.k, self.v, self.o) * g1.type_as(x)
        x = x + self._attn(self.n2(x), text, self.cq, self.ck, self.cv, self.co)
        h = (self.n3(x.float()) * (1 + sc2) + sh2).type_as(x)
        return x + self.down(F.gelu(self.up(h), approximate="tanh")) * g2.type_as(x)


def make_blocks(n: int, device: torch.device) -> tuple[nn.ModuleList, str]:
    """``n`` bf16 blocks on ``device``, and which implementation they are."""
    try:
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        def make() -> nn.Module:
            return WanTransformerBlock(DIM, FFN, HEADS, qk_norm="rms_norm_across_heads",
                                       cross_attn_norm=True, eps=1e-6)
        kind = "diffusers WanTransformerBlock"
    except Exception:  # noqa: BLE001
        make, kind = PlainWanBlock, "plain Wan-shaped block"
    with torch.device(device):
        blocks = nn.ModuleList(make() for _ in range(n)).to(torch.bfloat16)
    return blocks, kind


def quantize_linears(blocks: nn.Module, name: str) -> tuple[int, int]:
    """Replace every Linear weight by random ``name`` blocks; returns (quant bytes, largest layer)."""
    qt = get_quant_type(name)
    total = largest = 0
    for mod in blocks.modules():
        if isinstance(mod, nn.Linear):
            n, k = mod.weight.shape
            raw = random_blocks(name, n * k // qt.block_size, mod.weight.device).view(n, -1)
            mod._parameters["weight"] = nn.Parameter(
                GGMLTensor(raw, name, (n, k), torch.bfloat16), requires_grad=False)
            total += raw.numel()
            largest = max(largest, n * k * 2)
    swap_quant_layers(blocks)
    return total, largest


def inputs(tokens: int, device: torch.device, kind: str) -> tuple:
    """(hidden, text, temb, rotary) for the blocks' forward."""
    x = torch.randn(1, tokens, DIM, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, TEXT, DIM, device=device, dtype=torch.bfloat16)
    temb = torch.randn(1, 6, DIM, device=device, dtype=torch.float32) * 0.1
    rotary = None
    if kind.startswith("diffusers"):
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        rope = WanRotaryPosEmbed(DIM // HEADS, (1, 2, 2), 1024).to(device)
        # 832x480 pixels, 81 frames -> latent 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 patches.
        frames = max(1, tokens // (30 * 52))
        latent = torch.empty(1, 16, frames, 60, 104, device=device)
        cos, sin = rope(latent)
        rotary = (cos[:, :tokens], sin[:, :tokens])
    return x, text, temb, rotary


def measure(blocks: nn.Module, args: tuple, reps: int = 5) -> tuple[float, int]:
    """(median forward ms over ``reps`` runs, peak allocated bytes (absolute) during a forward)."""
    x, text, temb, rotary = args

    def fwd() -> torch.Tensor:
        h = x
        for b in blocks:
            h = b(h, text, temb, rotary)
        return h

    with torch.no_grad():
        fwd()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], peak


def weight_bytes(blocks: nn.Module) -> int:
    """Bytes the parameters take (raw blocks for quantized ones)."""
    total = 0
    for p in blocks.parameters():
        total += p.raw.numel() if isinstance(p, GGMLTensor) else p.numel() * p.element_size()
    return total


def run(n_blocks: int, tokens: int) -> dict:
    """Measure every variant; returns a dict of results."""
    from ggufvideo import kernels

    dev = torch.device("cuda")
    res: dict = {"blocks": n_blocks, "tokens": tokens, "variants": {}}
    for variant in ("bf16", "Q8_0", "Q4_K", "Q4_K torch path"):
        torch.cuda.empty_cache()
        kernels.release_workspace()
        blocks, kind = make_blocks(n_blocks, dev)
        res["kind"] = kind
        q_bytes = largest = 0
        if variant != "bf16":
            q_bytes, largest = quantize_linears(blocks, variant.split()[0])
        args = inputs(tokens, dev, kind)
        in_bytes = sum(t.numel() * t.element_size() for t in args[:3])
        kernels.set_enabled(False if variant.endswith("torch path") else None)
        try:
            ms, peak = measure(blocks, args)
        finally:
            kernels.set_enabled(None)
        res["variants"][variant] = dict(ms=ms, peak=peak, weights=weight_bytes(blocks),
                                        quant_linear_bytes=q_bytes, largest_layer=largest,
                                        input_bytes=in_bytes)
        print(f"# {variant}: {ms:.1f} ms, peak {peak / 2**30:.2f} GiB", flush=True)
        del blocks, args
    bf = res["variants"]["bf16"]
    activations = bf["peak"] - bf["weights"] - bf["input_bytes"]
    for name, v in res["variants"].items():
        v["time_ratio"] = v["ms"] / bf["ms"]
        v["mem_ratio"] = v["peak"] / bf["peak"]
        if name != "bf16":
            v["budget"] = v["weights"] + 1.2 * v["largest_layer"] + activations + v["input_bytes"]
    res["activations"] = activations
    return res


def table(res: dict) -> str:
    """Markdown summary."""
    out = [f"{res['blocks']} x {res['kind']} at {res['tokens']} tokens, bf16 activations",
           "| variant | ms | x bf16 | peak GiB | x bf16 | budget GiB | within budget |",
           "|---|---|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        budget = v.get("budget")
        b = "" if budget is None else f"{budget / 2**30:.2f}"
        ok = "" if budget is None else ("yes" if v["peak"] <= budget else "NO")
        out.append(f"| {name} | {v['ms']:.1f} | {v['time_ratio']:.3f} | {v['peak'] / 2**30:.2f} "
                   f"| {v['mem_ratio']:.2f} | {b} | {ok} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    res = run(a.blocks, a.tokens)
    print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
