"""Wan 2.1 / 2.2 transformers: T2V 1.3B/14B, I2V, FLF2V, TI2V-5B, the A14B experts, VACE.

Layouts: diffusers' (``WanTransformer3DModel`` / ``WanVACETransformer3DModel``) and the original
release's, which the widely shared GGUFs use (``blocks.N.self_attn.q``, ``cross_attn.k_img``,
``head.modulation``, ``time_projection.1``; ComfyUI's files put ``model.diffusion_model.`` before
them). The original ``norm3`` (before cross-attention) is diffusers' ``norm2`` and vice versa; the
original ``norm2`` has no weights. FLF2V's image positional embedding (``img_emb.emb_pos``) is
diffusers' ``condition_embedder.image_embedder.pos_embed``.

Config from shapes: the patch embedding gives dim, input channels and patch size; the blocks, the
FFN, text/time embedders, the image embedder and the cross-attention's added k/v give the rest.
The head width is not in any shape (the q/k norms span all heads): every released Wan model uses
128, which is assumed unless the file's ``diffusers.config`` metadata says otherwise. VACE's block
positions are spread evenly over the layers, as in both released VACE models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import Family, Rule, Shapes, rename

#: Width of one attention head in every released Wan model.
HEAD_DIM = 128


def _block_rules(blocks: str) -> list[Rule]:
    """Renames inside a transformer block (``blocks`` or ``vace_blocks``)."""
    b = f"{blocks}.{{i}}"
    rules = [rename(f"{b}.modulation", f"{b}.scale_shift_table"),
             rename(f"{b}.norm3.*", f"{b}.norm2.*"),
             rename(f"{b}.norm2.*", f"{b}.norm3.*"),
             rename(f"{b}.ffn.0.*", f"{b}.ffn.net.0.proj.*"),
             rename(f"{b}.ffn.2.*", f"{b}.ffn.net.2.*")]
    for orig, diff in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                     ("k_img", "add_k_proj"), ("v_img", "add_v_proj"),
                     ("norm_k_img", "norm_added_k"), ("norm_q", "norm_q"), ("norm_k", "norm_k")):
            rules.append(rename(f"{b}.{orig}.{o}.*", f"{b}.{diff}.{d}.*"))
    return rules


RULES: tuple[Rule, ...] = (
    rename("head.modulation", "scale_shift_table"),
    rename("head.head.*", "proj_out.*"),
    rename("time_embedding.0.*", "condition_embedder.time_embedder.linear_1.*"),
    rename("time_embedding.2.*", "condition_embedder.time_embedder.linear_2.*"),
    rename("time_projection.1.*", "condition_embedder.time_proj.*"),
    rename("text_embedding.0.*", "condition_embedder.text_embedder.linear_1.*"),
    rename("text_embedding.2.*", "condition_embedder.text_embedder.linear_2.*"),
    rename("img_emb.proj.0.*", "condition_embedder.image_embedder.norm1.*"),
    rename("img_emb.proj.1.*", "condition_embedder.image_embedder.ff.net.0.proj.*"),
    rename("img_emb.proj.3.*", "condition_embedder.image_embedder.ff.net.2.*"),
    rename("img_emb.proj.4.*", "condition_embedder.image_embedder.norm2.*"),
    rename("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    rename("vace_blocks.{i}.before_proj.*", "vace_blocks.{i}.proj_in.*"),
    rename("vace_blocks.{i}.after_proj.*", "vace_blocks.{i}.proj_out.*"),
    *_block_rules("blocks"),
    *_block_rules("vace_blocks"),
)


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``WanTransformer3DModel`` (or VACE) config from the tensors' shapes."""
    patch = s.require("patch_embedding.weight", "the model width and patch size", ndim=5)
    dim, in_channels, *patch_size = patch
    num_layers = s.count("blocks.{i}.*")
    if num_layers == 0:
        s.require("blocks.0.attn1.to_q.weight", "the number of layers")
    out_rows = s.require("proj_out.weight", "the output channels", ndim=2)[0]
    ffn = s.require("blocks.0.ffn.net.0.proj.weight", "the FFN width", ndim=2)[0]
    text = s.require("condition_embedder.text_embedder.linear_1.weight", "the text width", ndim=2)
    freq = s.require("condition_embedder.time_embedder.linear_1.weight", "the timestep width",
                     ndim=2)
    heads = dim // HEAD_DIM if dim % HEAD_DIM == 0 else 1
    config: dict[str, Any] = {
        "patch_size": list(patch_size),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": in_channels,
        "out_channels": out_rows // math.prod(patch_size),
        "text_dim": text[1],
        "freq_dim": freq[1],
        "ffn_dim": ffn,
        "num_layers": num_layers,
        "cross_attn_norm": s.has("blocks.0.norm2.weight"),
        "qk_norm": "rms_norm_across_heads" if s.has("blocks.0.attn1.norm_q.weight") else None,
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    if s.has("condition_embedder.image_embedder.norm1.weight"):
        config["image_dim"] = s["condition_embedder.image_embedder.norm1.weight"][0]
    if s.has("blocks.0.attn2.add_k_proj.weight"):
        config["added_kv_proj_dim"] = s["blocks.0.attn2.add_k_proj.weight"][1]
    if s.has("condition_embedder.image_embedder.pos_embed"):
        config["pos_embed_seq_len"] = s["condition_embedder.image_embedder.pos_embed"][1]
    n_vace = s.count("vace_blocks.{i}.*")
    if n_vace:
        vace_patch = s.require("vace_patch_embedding.weight", "the VACE input channels", ndim=5)
        step = max(1, num_layers // n_vace)
        config["vace_layers"] = list(range(0, step * n_vace, step))
        config["vace_in_channels"] = vace_patch[1]
    return config


def class_name(config: Mapping[str, Any]) -> str:
    return "WanVACETransformer3DModel" if "vace_layers" in config else "WanTransformer3DModel"


_SIZES = {1536: "1.3B", 3072: "5B", 5120: "14B"}


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    size = _SIZES.get(dim, f"dim {dim}, {config['num_layers']} layers")
    if "vace_layers" in config:
        return f"VACE {size}"
    if config.get("image_dim"):
        if config.get("pos_embed_seq_len"):
            return f"FLF2V {size} (Wan 2.1)"
        return f"I2V {size} (Wan 2.1)"
    if config["in_channels"] == 48:
        if config.get("out_channels", 48) != 48:  # 16 latent + 32 control channels in
            return f"Fun Control {size} (Wan 2.1)"
        return f"TI2V {size} (Wan 2.2)"
    if config["in_channels"] == 36:
        return f"I2V {size} (Wan 2.2 A14B expert)" if dim == 5120 else f"I2V {size}"
    if dim == 5120:
        return "T2V 14B (Wan 2.1, or a Wan 2.2 T2V A14B expert)"
    return f"T2V {size}"


FAMILY: Family[Any] = Family(
    name="wan",
    title="Wan 2.1/2.2 transformer",
    kind="transformer",
    architectures=("wan",),
    signatures={
        "diffusers": (("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight"),
                      ("condition_embedder.time_proj.weight", "blocks.0.attn1.norm_q.weight")),
        "original": (("time_projection.1.weight", "blocks.0.self_attn.q.weight"),
                     ("head.modulation", "blocks.0.self_attn.q.weight"),
                     ("head.modulation", "blocks.0.self_attn.norm_q.weight")),
    },
    rules={"original": RULES},
    # (marker names as ComfyUI's model detection and diffusers' converters know them)
    unsupported={
        "casual_audio_encoder.*": "Wan 2.2 S2V (speech-to-video)",
        "audio_injector.*": "Wan 2.2 S2V (speech-to-video)",
        "motion_encoder.*": "Wan 2.2 Animate",
        "face_adapter.*": "Wan 2.2 Animate",
        "face_encoder.*": "Wan 2.2 Animate",
        "pose_patch_embedding.*": "Wan 2.2 Animate",
        "audio_proj.*": "HuMo (audio-conditioned Wan)",
        "control_adapter.*": "Wan Fun Camera (camera-control adapter)",
        "ref_conv.*": "Wan Fun Control with a reference image (ref_conv)",
        "fps_embedding.*": "SkyReels-V2 (frame-rate conditioning)",
        "fps_projection.*": "SkyReels-V2 (frame-rate conditioning)",
    },
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
)
