"""CLIP vision encoders (Wan 2.1 I2V / FLF2V's image encoder: OpenCLIP ViT-H/14), as transformers
builds them (``CLIPVisionModel``).

One layout, transformers' (``vision_model.embeddings.patch_embedding``,
``vision_model.encoder.layers.N.self_attn.q_proj``, ``vision_model.post_layernorm``...): the
single-file ``clip_vision_h.safetensors`` ComfyUI setups hold uses it, as does the
``image_encoder/`` folder of diffusers' Wan I2V releases. A whole CLIP's text tower and the
projections beside the vision tower are left out.

Config from shapes: the patch embedding gives width and patch size, the position table the image
size (``(image / patch)^2 + 1`` positions), the MLP its width, the layers are counted. The head
count is in no shape: 12 for a 768-wide tower, 16 for the 1024-, 1280- and 1664-wide ones (the
B, L, H and bigG towers); otherwise 64-wide heads. Neither is the activation: OpenCLIP's H and
bigG (released by OpenCLIP only) use ``gelu``; a 768- or 1024-wide tower is taken for OpenAI's
B or L/14 (``quick_gelu``), the ones image pipelines use -- an OpenCLIP-trained B or L needs
``config={"hidden_act": "gelu"}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import Family, Shapes

_V = "vision_model"
_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_SIZES = {1280: "ViT-H/14", 1024: "ViT-L/14", 1664: "ViT-bigG/14", 768: "ViT-B"}


def infer_config(s: Shapes) -> dict[str, Any]:
    """transformers' ``CLIPVisionConfig`` fields from the tensors' shapes."""
    hidden, _, patch, _ = s.require(f"{_V}.embeddings.patch_embedding.weight",
                                    "the width and patch size", ndim=4)
    positions = s.require(f"{_V}.embeddings.position_embedding.weight", "the image size",
                          ndim=2)[0]
    side = math.isqrt(positions - 1)
    image = side * patch
    layers = s.count(f"{_V}.encoder.layers.{{i}}.*")
    inter = s.require(f"{_V}.encoder.layers.0.mlp.fc1.weight", "the MLP width", ndim=2)[0]
    cfg: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": _HEADS.get(hidden, max(1, hidden // 64)),
        "patch_size": patch,
        "image_size": image,
        "num_channels": 3,
        "hidden_act": "quick_gelu" if hidden in (768, 1024) else "gelu",
        "layer_norm_eps": 1e-5,
        "architectures": ["CLIPVisionModel"],
    }
    if s.has("visual_projection.weight"):
        cfg["projection_dim"] = s.require("visual_projection.weight", "the projection", ndim=2)[0]
    return cfg


def class_name(config: Mapping[str, Any]) -> str:
    return "CLIPVisionModel"


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    name = _SIZES.get(config["hidden_size"], f"width {config['hidden_size']}")
    return f"CLIP vision {name} ({config['image_size']}px, {config['num_hidden_layers']} layers)"


FAMILY: Family[Any] = Family(
    name="clip-vision",
    title="CLIP vision encoder",
    kind="image-encoder",
    architectures=("clip-vision", "clip"),
    signatures={
        "diffusers": ((f"{_V}.embeddings.patch_embedding.weight",
                       f"{_V}.encoder.layers.0.self_attn.q_proj.weight"),),
    },
    rules={},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
    library="transformers",
    # (a whole CLIP's other parts; position_ids: a buffer older transformers saved)
    unused=("visual_projection.*", "text_model.*", "text_projection.*", "logit_scale",
            "vision_model.embeddings.position_ids"),
)
