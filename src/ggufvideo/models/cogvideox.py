"""CogVideoX transformers (``CogVideoXTransformer3DModel``): CogVideoX-2B, -5B, -5B-I2V (1.0) and
CogVideoX1.5-5B, -5B-I2V.

Layout: diffusers' only (the published GGUFs and ComfyUI files of CogVideoX use it).

Config from shapes: the text projection gives the width and text width, a block's q norm the head
width, the timestep (and, for 1.5 I2V, the ``ofs``) embedders their widths. The patch embedding
tells the generation: 1.0 embeds 2x2 patches of each frame by a convolution (which gives the input
channels, the patch size and ``patch_bias``), 1.5 embeds 2x2x2 space-time patches by a linear
layer. A stored ``patch_embed.pos_embedding`` means learned positions (1.0 5B-I2V).

Not in any shape, so the released models' values are used:

* 1.5's patch size 2 and temporal patch size 2 (its linear embedding only holds their product with
  the channels), and ``patch_bias`` false (its linear layer has a bias whatever the flag says).
* ``use_rotary_positional_embeddings``: 1.0's fixed sin/cos positions are not stored, so rotary and
  sin/cos look the same; only CogVideoX-2B (width 1920) uses sin/cos, every other release rotary.
* ``sample_height/width/frames`` (60/90/49 for 1.0, 300/300/81 for 1.5) and
  ``max_text_seq_length`` 226: they size the learned positions, which only fixes their product.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family, Shapes

#: Width of CogVideoX-2B, the one release with sin/cos (not rotary) positions.
WIDTH_2B = 1920
#: 1.5's spatial and temporal patch sizes.
PATCH_15, PATCH_T_15 = 2, 2
SAMPLE_10 = {"sample_height": 60, "sample_width": 90, "sample_frames": 49}
SAMPLE_15 = {"sample_height": 300, "sample_width": 300, "sample_frames": 81}


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``CogVideoXTransformer3DModel`` config from the tensors' shapes."""
    inner, text_dim = s.require("patch_embed.text_proj.weight", "the width and text width", ndim=2)
    head_dim = s.require("transformer_blocks.0.attn1.norm_q.weight", "the head width", ndim=1)[0]
    proj = s.require("patch_embed.proj.weight", "the patch size and input channels")
    time_dim = s.require("time_embedding.linear_1.weight", "the timestep width", ndim=2)[0]
    out_rows = s.require("proj_out.weight", "the output channels", ndim=2)[0]
    num_layers = s.count("transformer_blocks.{i}.*")
    if len(proj) == 4:  # 1.0: a Conv2d over each frame
        patch, patch_t, in_channels = proj[2], None, proj[1]
        patch_bias = s.has("patch_embed.proj.bias")
        volume, sample = patch * patch, SAMPLE_10
    else:  # 1.5: a Linear over space-time patches
        s.require("patch_embed.proj.weight", "the patch size and input channels", ndim=2)
        patch, patch_t, patch_bias = PATCH_15, PATCH_T_15, False
        volume, sample = PATCH_15 * PATCH_15 * PATCH_T_15, SAMPLE_15
        in_channels = proj[1] // volume
    learned = s.has("patch_embed.pos_embedding")
    ofs = s["ofs_embedding.linear_1.weight"][0] if s.has("ofs_embedding.linear_1.weight") else None
    return {
        "num_attention_heads": inner // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": out_rows // volume,
        "time_embed_dim": time_dim,
        "ofs_embed_dim": ofs,
        "text_embed_dim": text_dim,
        "num_layers": num_layers,
        "attention_bias": s.has("transformer_blocks.0.attn1.to_q.bias"),
        "norm_elementwise_affine": s.has("norm_final.weight"),
        "patch_size": patch,
        "patch_size_t": patch_t,
        "patch_bias": patch_bias,
        "max_text_seq_length": 226,
        "use_learned_positional_embeddings": learned,
        "use_rotary_positional_embeddings": learned or patch_t is not None or inner != WIDTH_2B,
        **sample,
    }


def class_name(config: Mapping[str, Any]) -> str:
    return "CogVideoXTransformer3DModel"


_SIZES = {1920: "2B", 3072: "5B"}


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    size = _SIZES.get(dim, f"dim {dim}, {config['num_layers']} layers")
    version = "CogVideoX1.5" if config["patch_size_t"] else "CogVideoX"
    i2v = "-I2V" if config["in_channels"] == 2 * config["out_channels"] else ""
    return f"{version}-{size}{i2v}"


FAMILY: Family[Any] = Family(
    name="cogvideox",
    title="CogVideoX transformer",
    kind="transformer",
    architectures=("cogvideox", "cogvideo"),
    signatures={
        "diffusers": (("patch_embed.text_proj.weight", "time_embedding.linear_1.weight",
                       "transformer_blocks.0.norm1.linear.weight"),),
    },
    rules={},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
)
