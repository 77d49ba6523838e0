"""Shared helpers for the LoRA tests: a tiny Wan model, LoRA state dicts in every naming scheme."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ggufvideo import GGMLTensor, quantize
from ggufvideo.ops import swap_quant_layers

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
              out_channels=16, text_dim=64, freq_dim=32, ffn_dim=512, num_layers=2,
              cross_attn_norm=True, eps=1e-6, qk_norm="rms_norm_across_heads")

#: (original name, diffusers name) of layers the test LoRAs target.
TARGETS = [("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
           ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0"),
           ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj"),
           ("blocks.1.ffn.2", "blocks.1.ffn.net.2")]


def wan_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=g),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g))


def pairs(shapes: dict[str, tuple[int, ...]], rank: int = 4, seed: int = 0
          ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """diffusers layer name -> (down, up, alpha) for every TARGETS layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for _, diff in TARGETS:
        n, k = shapes[diff + ".weight"]
        out[diff] = (torch.randn(rank, k, generator=g) * 0.05, torch.randn(n, rank, generator=g) * 0.05,
                     float(rank) / 2)
    return out


def as_format(p: dict[str, tuple[torch.Tensor, torch.Tensor, float]], fmt: str
              ) -> dict[str, torch.Tensor]:
    """The LoRA ``p`` (diffusers names) written in scheme ``fmt`` (alpha folded where the scheme has
    none: peft files carry none)."""
    orig_of = {d: o for o, d in TARGETS}
    sd: dict[str, torch.Tensor] = {}
    for diff, (down, up, alpha) in p.items():
        orig = orig_of[diff]
        if fmt == "kohya":
            base = "lora_unet_" + orig.replace(".", "_")
            sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"] = down, up
            sd[base + ".alpha"] = torch.tensor(alpha)
        elif fmt == "comfy":
            base = "diffusion_model." + orig
            sd[base + ".lora_A.weight"], sd[base + ".lora_B.weight"] = down, up
            sd[base + ".alpha"] = torch.tensor(alpha)
        elif fmt == "diffusers":
            base = "transformer." + diff
            sd[base + ".lora_A.weight"] = down
            sd[base + ".lora_B.weight"] = up * (alpha / down.shape[0])
        elif fmt == "diffusers_kohya":  # kohya's down/up/alpha under diffusers' names
            base = "lora_unet_" + diff.replace(".", "_")
            sd[base + ".lora_down.weight"], sd[base + ".lora_up.weight"] = down, up
            sd[base + ".alpha"] = torch.tensor(alpha)
        else:
            raise ValueError(fmt)
    return sd


def merged_delta(p: dict[str, tuple[torch.Tensor, torch.Tensor, float]], scale: float = 1.0
                 ) -> dict[str, torch.Tensor]:
    """diffusers weight key -> float32 delta ``scale * alpha / rank * up @ down``."""
    return {d + ".weight": scale * (alpha / down.shape[0]) * (up @ down)
            for d, (down, up, alpha) in p.items()}


def quantize_linears(model: nn.Module, qtype: str = "Q8_0") -> nn.Module:
    """``model`` with every Linear weight whose rows fit ``qtype``'s blocks quantized, and its
    layers made quant-aware."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.in_features % 32 == 0:
            w = m.weight.detach()
            m._parameters["weight"] = nn.Parameter(
                GGMLTensor(quantize(w, qtype), qtype, tuple(w.shape), torch.float32),
                requires_grad=False)
    return swap_quant_layers(model)


def with_dense_twin(q: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(``q``, a copy of it whose quantized weights are their decoded float32 values)."""
    dense = copy.deepcopy(q)
    for m in dense.modules():
        w = m._parameters.get("weight")
        if isinstance(w, GGMLTensor):
            m._parameters["weight"] = nn.Parameter(w.dequantize(torch.float32), requires_grad=False)
    return q, dense


def quantized_wan() -> tuple[nn.Module, nn.Module]:
    """(a tiny diffusers Wan model with Q8_0 linears, its float32 twin); needs diffusers."""
    import diffusers

    torch.manual_seed(0)
    return with_dense_twin(quantize_linears(diffusers.WanTransformer3DModel(**CONFIG).eval()))


def run_wan(model: nn.Module) -> torch.Tensor:
    """The Wan model's output on :func:`wan_inputs`."""
    with torch.no_grad():
        return model(**wan_inputs(), return_dict=False)[0]
