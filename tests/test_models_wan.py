"""The Wan transformer family: every variant's layouts and inferred config."""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402
from family_checks import (  # noqa: E402
    check_against_diffusers_converter,
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import UnknownModelError  # noqa: E402
from ggufvideo.models import ShapeOps, describe, get_family  # noqa: E402

WAN = get_family("wan")

# Tiny configs of every variant (head width 128 as in every released Wan model; see wan.py).
BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True)
VARIANTS = {
    "t2v": (WanTransformer3DModel, BASE, "T2V"),
    "i2v-2.1": (WanTransformer3DModel, {**BASE, "in_channels": 36, "image_dim": 64,
                                        "added_kv_proj_dim": 256}, "I2V"),
    "flf2v": (WanTransformer3DModel, {**BASE, "in_channels": 36, "image_dim": 64,
                                      "added_kv_proj_dim": 256, "pos_embed_seq_len": 514}, "FLF2V"),
    "i2v-a14b-expert": (WanTransformer3DModel, {**BASE, "in_channels": 36}, "I2V"),
    "ti2v-5b": (WanTransformer3DModel, {**BASE, "in_channels": 48, "out_channels": 48}, "TI2V"),
    "no-cross-norm": (WanTransformer3DModel, {**BASE, "cross_attn_norm": False}, "T2V"),
    "vace": (WanVACETransformer3DModel, {**BASE, "num_layers": 4, "vace_layers": [0, 2],
                                         "vace_in_channels": 96}, "VACE"),
}


def build(name: str) -> torch.nn.Module:
    cls, config, _ = VARIANTS[name]
    torch.manual_seed(0)
    return cls(**config)


@pytest.mark.parametrize("name", VARIANTS)
def test_original_layout_matches_diffusers_converter(name):
    sd = random_state_dict(build(name))
    # diffusers' converter does not know FLF2V's image position embedding (img_emb.emb_pos)
    skip = ("condition_embedder.image_embedder.pos_embed",) if name == "flf2v" else ()
    check_against_diffusers_converter(WAN, "original", sd, convert_wan_transformer_to_diffusers,
                                      not_converted_by_diffusers=skip)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("name", VARIANTS)
def test_config_inferred_from_shapes(name, layout):
    model = build(name)
    check_config_inference(WAN, model, layout, "wan")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert VARIANTS[name][2] in describe(shapes).variant


def test_quantized_weights_convert_exactly_both_ways():
    sd = random_state_dict(build("i2v-2.1"))
    assert check_exact_row_splits(WAN, "original", sd) > 10


def test_original_norm3_is_diffusers_norm2():
    sd = random_state_dict(build("t2v"))
    from ggufvideo.models.tensors import TensorOps

    orig = WAN.convert(sd, "diffusers", "original", TensorOps())
    assert torch.equal(orig["blocks.1.norm3.weight"], sd["blocks.1.norm2.weight"])
    assert "blocks.1.norm2.weight" not in orig


@pytest.mark.parametrize("size,dim,layers,heads,ffn", [("1.3B", 1536, 30, 12, 8960),
                                                       ("14B", 5120, 40, 40, 13824)])
def test_released_sizes_infer_their_heads(size, dim, layers, heads, ffn):
    shapes = {"patch_embedding.weight": (dim, 16, 1, 2, 2), "proj_out.weight": (64, dim),
              "condition_embedder.text_embedder.linear_1.weight": (dim, 4096),
              "condition_embedder.time_embedder.linear_1.weight": (dim, 256),
              "condition_embedder.time_proj.weight": (6 * dim, dim)}
    for i in range(layers):
        shapes[f"blocks.{i}.attn1.to_q.weight"] = (dim, dim)
        shapes[f"blocks.{i}.attn1.norm_q.weight"] = (dim,)
        shapes[f"blocks.{i}.ffn.net.0.proj.weight"] = (ffn, dim)
        shapes[f"blocks.{i}.norm2.weight"] = (dim,)
    desc = describe(shapes, "wan")
    assert desc.config["num_attention_heads"] == heads
    assert desc.config["num_layers"] == layers
    assert size in desc.variant


def _original_shapes(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    shapes = {k: tuple(v.shape) for k, v in build(name).state_dict().items()}
    return {prefix + k: v for k, v in WAN.convert(shapes, "diffusers", "original",
                                                  ShapeOps()).items()}


@pytest.mark.parametrize("marker, named", [
    ("casual_audio_encoder.encoder.final_linear.weight", "S2V"),
    ("audio_injector.injector.0.q.weight", "S2V"),
    ("face_adapter.fuser_blocks.0.k_norm.weight", "Animate"),
    ("motion_encoder.dec.direction.weight", "Animate"),
    ("pose_patch_embedding.weight", "Animate"),
    ("audio_proj.audio_proj_glob_1.layer.weight", "HuMo"),
    ("control_adapter.conv.weight", "Fun Camera"),
    ("ref_conv.weight", "Fun Control with a reference image"),
    ("fps_embedding.weight", "SkyReels-V2"),
])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_variants_with_modules_of_their_own_are_named_not_built(marker, named, prefix):
    # built as the plain model they would fail later on "unexpected keys" (or, worse, run
    # without their extra conditioning); refused by the variant's name instead
    shapes = {**_original_shapes("t2v", prefix), prefix + marker: (256, 16)}
    with pytest.raises(UnknownModelError, match=rf"{re.escape(named)}.*{re.escape(marker)}"):
        describe(shapes, "wan")


def test_fun_control_is_not_called_ti2v():
    shapes = _original_shapes("t2v")
    shapes["patch_embedding.weight"] = (256, 48, 1, 2, 2)  # 16 latent + 32 control channels in
    assert describe(shapes, "wan").variant.startswith("Fun Control")
