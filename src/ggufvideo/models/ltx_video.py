"""LTX-Video transformers: 0.9.0 to 0.9.6 (2B) and 0.9.7 / 0.9.8 (13B, and their distilled ones).

Layouts: diffusers' (``LTXVideoTransformer3DModel``) and the release's (its single-file
checkpoints put ``model.diffusion_model.`` before every transformer key; the shared GGUFs,
``general.architecture = ltxv``, carry the same names): ``patchify_proj`` is diffusers'
``proj_in``, ``adaln_single`` its ``time_embed``, and the attentions' ``q_norm``/``k_norm`` are
``norm_q``/``norm_k``. Everything else has the same name in both.

Config from shapes: ``proj_in`` gives the width and the latent channels (the VAE patchifies, so
the transformer's own patch sizes are 1), ``proj_out`` the output channels, the cross-attention's
keys the text width it attends to, ``caption_projection`` the text encoder's width. The head count
is not in any shape (the q/k norms span all heads): every released model uses 32 heads (64 wide in
the 2B models, 128 in the 13B ones), which is assumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family, Rule, Shapes, rename

#: Heads of every released LTX-Video transformer.
NUM_HEADS = 32

RULES: tuple[Rule, ...] = (
    rename("patchify_proj.*", "proj_in.*"),
    rename("adaln_single.*", "time_embed.*"),
    rename("transformer_blocks.{i}.attn{a}.q_norm.*", "transformer_blocks.{i}.attn{a}.norm_q.*"),
    rename("transformer_blocks.{i}.attn{a}.k_norm.*", "transformer_blocks.{i}.attn{a}.norm_k.*"),
)


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``LTXVideoTransformer3DModel`` config from the tensors' shapes."""
    inner, in_channels = s.require("proj_in.weight", "the model width and latent channels",
                                   ndim=2)
    num_layers = s.count("transformer_blocks.{i}.*")
    if num_layers == 0:
        s.require("transformer_blocks.0.attn1.to_q.weight", "the number of layers")
    out_channels = s.require("proj_out.weight", "the output channels", ndim=2)[0]
    cross = s.require("transformer_blocks.0.attn2.to_k.weight", "the cross-attention width",
                      ndim=2)[1]
    caption = s.require("caption_projection.linear_1.weight", "the text encoder width",
                        ndim=2)[1]
    heads = NUM_HEADS if inner % NUM_HEADS == 0 else 1
    b = "transformer_blocks.0"
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "patch_size": 1,
        "patch_size_t": 1,
        "num_attention_heads": heads,
        "attention_head_dim": inner // heads,
        "cross_attention_dim": cross,
        "num_layers": num_layers,
        "caption_channels": caption,
        "norm_elementwise_affine": s.has(f"{b}.norm1.weight"),
        "attention_bias": s.has(f"{b}.attn1.to_q.bias"),
        "attention_out_bias": s.has(f"{b}.attn1.to_out.0.bias"),
    }


def class_name(config: Mapping[str, Any]) -> str:
    return "LTXVideoTransformer3DModel"


_SIZES = {(2048, 28): "2B (0.9.0-0.9.6)", (4096, 48): "13B (0.9.7/0.9.8)"}


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return _SIZES.get((dim, config["num_layers"]), f"dim {dim}, {config['num_layers']} layers")


FAMILY: Family[Any] = Family(
    name="ltx-video",
    title="LTX-Video transformer",
    kind="transformer",
    architectures=("ltxv", "ltx-video", "ltxvideo"),
    signatures={
        "diffusers": (("proj_in.weight", "time_embed.linear.weight",
                       "caption_projection.linear_1.weight",
                       "transformer_blocks.0.attn1.norm_q.weight"),),
        "original": (("patchify_proj.weight", "adaln_single.linear.weight"),),
    },
    rules={"original": RULES},
    unsupported={"audio_patchify_proj.*": "LTX-2 (audio and video)",
                 "audio_adaln_single.*": "LTX-2 (audio and video)",
                 "audio_proj_in.*": "LTX-2 (audio and video)"},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
    original_prefix="model.diffusion_model.",
)
