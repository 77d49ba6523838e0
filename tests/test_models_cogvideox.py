"""The CogVideoX transformer family: every release's inferred config and variant name."""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from family_checks import (  # noqa: E402
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import ModelLoadError  # noqa: E402
from ggufvideo.models import describe, families, get_family  # noqa: E402

COG = get_family("cogvideox")

# Tiny versions of each release (widths of 32 so weights quantize).
BASE = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            time_embed_dim=32, text_embed_dim=32, num_layers=2)
V15 = dict(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81,
           use_rotary_positional_embeddings=True)
VARIANTS = {
    "2b": (BASE, "CogVideoX-dim 32, 2 layers"),
    "5b": ({**BASE, "use_rotary_positional_embeddings": True}, "CogVideoX-dim 32, 2 layers"),
    "5b-i2v": ({**BASE, "in_channels": 8, "use_rotary_positional_embeddings": True,
                "use_learned_positional_embeddings": True}, "CogVideoX-dim 32, 2 layers-I2V"),
    "1.5-5b": ({**BASE, **V15}, "CogVideoX1.5-dim 32, 2 layers"),
    "1.5-5b-i2v": ({**BASE, **V15, "in_channels": 8, "ofs_embed_dim": 32},
                   "CogVideoX1.5-dim 32, 2 layers-I2V"),
    "no-affine-no-bias": ({**BASE, "norm_elementwise_affine": False, "attention_bias": False,
                           "patch_bias": False, "use_rotary_positional_embeddings": True},
                          "CogVideoX-dim 32"),
}


def build(name: str) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(**VARIANTS[name][0])


@pytest.mark.parametrize("name", VARIANTS)
def test_config_inferred_from_shapes(name):
    # 2B's sin/cos positions are told from rotary by its released width only (see cogvideox.py)
    ignore = ("use_rotary_positional_embeddings",) if name == "2b" else ()
    model = build(name)
    check_config_inference(COG, model, "diffusers", "cogvideox", ignore=ignore)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix in ("", "transformer.", "model.diffusion_model."):
        desc = describe({prefix + k: v for k, v in shapes.items()})
        assert desc.detection.family is COG and desc.detection.prefix == prefix
        assert desc.variant.startswith(VARIANTS[name][1]), desc.variant


def test_no_other_family_claims_these_names():
    keys = set(build("1.5-5b-i2v").state_dict()) | set(build("5b-i2v").state_dict())
    assert [f.name for f in families().values() if f.layout_of(keys)] == ["cogvideox"]


@pytest.mark.parametrize("config,name,rotary", [
    (dict(), "CogVideoX-2B", False),
    (dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
     "CogVideoX-5B", True),
    (dict(num_attention_heads=48, num_layers=42, in_channels=32,
          use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
     "CogVideoX-5B-I2V", True),
    (dict(num_attention_heads=48, num_layers=42, **V15), "CogVideoX1.5-5B", True),
    (dict(num_attention_heads=48, num_layers=42, in_channels=32, ofs_embed_dim=512, **V15),
     "CogVideoX1.5-5B-I2V", True),
])
def test_released_shapes(config, name, rotary):
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**config)
    desc = describe({k: tuple(v.shape) for k, v in model.state_dict().items()}, "cogvideox")
    assert desc.variant == name
    assert desc.config["use_rotary_positional_embeddings"] is rotary
    for k, v in desc.config.items():
        assert model.config[k] == v, k


def test_quantized_weights_pass_through():
    # one layout, nothing to split: quantized weights come back as the very same blocks
    sd = random_state_dict(build("1.5-5b-i2v"))
    assert check_exact_row_splits(COG, "diffusers", sd) > 10


@pytest.mark.parametrize("drop", ["proj_out.weight", "transformer_blocks.0.attn1.norm_q.weight",
                                  "patch_embed.proj.weight"])
def test_missing_tensor_is_named(drop):
    shapes = {k: tuple(v.shape) for k, v in build("5b").state_dict().items()}
    del shapes[drop]
    with pytest.raises(ModelLoadError, match=re.escape(drop)):
        describe(shapes)
