"""Genmo's Mochi 1 transformer (``MochiTransformer3DModel``), an asymmetric joint-attention DiT.

Layouts: diffusers', and the original release's (Genmo's ``dit.safetensors``; ComfyUI's files put
``model.diffusion_model.`` before the same names): ``x_embedder``, ``t_embedder.mlp``,
``t5_y_embedder`` (the caption attention pool), ``t5_yproj``, ``blocks.N.mod_x/mod_y``,
``attn.qkv_x/qkv_y`` (each one fused tensor: diffusers' q, k, v, in that order, for the video and
the caption stream), ``attn.q_norm_x`` ..., ``attn.proj_x/proj_y``, ``mlp_x/mlp_y.w1/w2`` and
``final_layer.mod/linear``. Row-order differences: the gated FFN's ``w1`` holds (value, gate)
where diffusers' ``ff.net.0.proj`` holds (gate, value), and ``final_layer.mod`` holds (shift,
scale) where diffusers' ``norm_out.linear`` holds (scale, shift).

The last block only attends for the caption, it does not update it: it has no ``proj_y`` nor
``mlp_y``, and its ``mod_y`` makes one scale (diffusers' ``norm1_context.linear_1``) rather than
four modulations (``norm1_context.linear``). The rules tell it by the missing ``proj_y``, so any
layer count works.

Config from shapes: ``pos_frequencies`` (3 x heads x head_dim/2) gives the heads, the patch
embedding the width, input channels and patch size, the caption projection and the attention pool
the caption widths. Not in any shape: the caption length (``max_sequence_length`` 256), the
activation (SwiGLU) and q/k norm (RMS) of the released model, which are diffusers' defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family, Rule, Shapes, rename


def _has_caption_out(captures: Mapping[str, str], keys: Mapping[str, Any]) -> bool:
    """Not the last block: it still projects the caption stream back (``attn.proj_y``)."""
    i = captures["i"]
    return any(f"blocks.{i}.attn.proj_y.{p}" in keys for p in ("weight", "bias"))


def _block_rules() -> list[Rule]:
    o, d = "blocks.{i}", "transformer_blocks.{i}"
    rules = [
        rename(f"{o}.mod_x.*", f"{d}.norm1.linear.*"),
        Rule((f"{o}.mod_y.*",), (f"{d}.norm1_context.linear.*",), when=_has_caption_out),
        rename(f"{o}.mod_y.*", f"{d}.norm1_context.linear_1.*"),
        Rule((f"{o}.attn.qkv_x.*",), tuple(f"{d}.attn1.{p}.*" for p in ("to_q", "to_k", "to_v"))),
        Rule((f"{o}.attn.qkv_y.*",),
             tuple(f"{d}.attn1.{p}.*" for p in ("add_q_proj", "add_k_proj", "add_v_proj"))),
        rename(f"{o}.attn.proj_x.*", f"{d}.attn1.to_out.0.*"),
        rename(f"{o}.attn.proj_y.*", f"{d}.attn1.to_add_out.*"),
        Rule((f"{o}.mlp_x.w1.*",), (f"{d}.ff.net.0.proj.*",), swap_halves=True),
        rename(f"{o}.mlp_x.w2.*", f"{d}.ff.net.2.*"),
        Rule((f"{o}.mlp_y.w1.*",), (f"{d}.ff_context.net.0.proj.*",), swap_halves=True),
        rename(f"{o}.mlp_y.w2.*", f"{d}.ff_context.net.2.*"),
    ]
    for orig, diff in (("q_norm_x", "norm_q"), ("k_norm_x", "norm_k"),
                       ("q_norm_y", "norm_added_q"), ("k_norm_y", "norm_added_k")):
        rules.append(rename(f"{o}.attn.{orig}.*", f"{d}.attn1.{diff}.*"))
    return rules


RULES: tuple[Rule, ...] = (
    rename("x_embedder.proj.*", "patch_embed.proj.*"),
    rename("t_embedder.mlp.0.*", "time_embed.timestep_embedder.linear_1.*"),
    rename("t_embedder.mlp.2.*", "time_embed.timestep_embedder.linear_2.*"),
    rename("t5_y_embedder.*", "time_embed.pooler.*"),
    rename("t5_yproj.*", "time_embed.caption_proj.*"),
    Rule(("final_layer.mod.*",), ("norm_out.linear.*",), swap_halves=True),
    rename("final_layer.linear.*", "proj_out.*"),
    *_block_rules(),
)


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``MochiTransformer3DModel`` config from the tensors' shapes."""
    _, heads, half_head = s.require("pos_frequencies", "the attention heads", ndim=3)
    _, in_channels, patch, _ = s.require("patch_embed.proj.weight",
                                         "the width and patch size", ndim=4)
    num_layers = s.count("transformer_blocks.{i}.*")
    if num_layers == 0:
        s.require("transformer_blocks.0.norm1.linear.weight", "the number of layers")
    caption = s.require("time_embed.caption_proj.weight", "the caption widths", ndim=2)
    time = s.require("time_embed.timestep_embedder.linear_1.weight", "the timestep width", ndim=2)
    out_channels = s.require("proj_out.weight", "the output channels", ndim=2)[0] // patch**2
    return {
        "patch_size": patch,
        "num_attention_heads": heads,
        "attention_head_dim": 2 * half_head,
        "num_layers": num_layers,
        "pooled_projection_dim": caption[0],
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,  # None: same
        "qk_norm": "rms_norm",
        "text_embed_dim": caption[1],
        "time_embed_dim": time[1],
        "activation_fn": "swiglu",
        "max_sequence_length": 256,
    }


def class_name(config: Mapping[str, Any]) -> str:
    return "MochiTransformer3DModel"


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    if dim == 3072 and config["num_layers"] == 48:
        return "Mochi 1 (10B)"
    return f"Mochi-style, dim {dim}, {config['num_layers']} layers"


FAMILY: Family[Any] = Family(
    name="mochi",
    title="Mochi 1 transformer",
    kind="transformer",
    architectures=("mochi",),
    signatures={
        "diffusers": (("time_embed.pooler.to_kv.weight",
                       "transformer_blocks.0.norm1.linear.weight"),),
        "original": (("t5_y_embedder.to_kv.weight", "blocks.0.mod_x.weight"),),
    },
    rules={"original": RULES},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
)
