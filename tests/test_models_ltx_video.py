"""The LTX-Video transformer family: layouts against diffusers' converter, inferred config."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import LTXVideoTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ltx_transformer_checkpoint_to_diffusers,
)
from family_checks import (  # noqa: E402
    check_against_diffusers_converter,
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import ModelLoadError, UnknownModelError  # noqa: E402
from ggufvideo.models import ShapeOps, describe, get_family  # noqa: E402

LTX = get_family("ltx-video")

# Tiny configs (32 heads as in every released LTX-Video model; see ltx_video.py).
BASE = dict(in_channels=32, out_channels=32, num_attention_heads=32, attention_head_dim=2,
            cross_attention_dim=64, num_layers=2, caption_channels=48)
VARIANTS = {
    "base": BASE,
    "affine-norms-no-bias": {**BASE, "norm_elementwise_affine": True, "attention_bias": False,
                             "attention_out_bias": False, "num_layers": 3},
    "wider": {**BASE, "attention_head_dim": 4, "in_channels": 64, "out_channels": 64},
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(**VARIANTS[name])


@pytest.mark.parametrize("name", VARIANTS)
def test_original_layout_matches_diffusers_converter(name):
    check_against_diffusers_converter(LTX, "original", random_state_dict(build(name)),
                                      convert_ltx_transformer_checkpoint_to_diffusers,
                                      prefix="model.diffusion_model.")


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("name", VARIANTS)
def test_config_inferred_from_shapes(name, layout):
    check_config_inference(LTX, build(name), layout, "ltxv")


def test_original_file_with_its_prefix_is_detected():
    shapes = {k: tuple(v.shape) for k, v in build("base").state_dict().items()}
    orig = LTX.convert(shapes, "diffusers", "original", ShapeOps())
    desc = describe({LTX.original_prefix + k: v for k, v in orig.items()}, "ltxv")
    assert desc.detection.family is LTX and desc.detection.prefix == "model.diffusion_model."
    assert desc.config["num_layers"] == 2


def test_quantized_weights_convert_exactly_both_ways():
    sd = random_state_dict(build("base"))
    assert check_exact_row_splits(LTX, "original", sd) > 10


@pytest.mark.parametrize("layout,drop,named", [
    ("diffusers", "proj_out.weight", "proj_out.weight"),
    ("original", "transformer_blocks.0.attn2.to_k.weight", "transformer_blocks.0.attn2.to_k.weight"),
])
def test_missing_tensor_is_named(layout, drop, named):
    shapes = {k: tuple(v.shape) for k, v in build("base").state_dict().items()}
    renamed = LTX.convert(shapes, "diffusers", layout, ShapeOps())
    del renamed[drop]
    with pytest.raises(ModelLoadError, match=named.replace(".", r"\.")):
        describe(renamed, "ltxv")


@pytest.mark.parametrize("dim,layers,head_dim,label", [(2048, 28, 64, "2B"),
                                                       (4096, 48, 128, "13B")])
def test_released_sizes_infer_their_heads(dim, layers, head_dim, label):
    shapes = {"patchify_proj.weight": (dim, 128), "proj_out.weight": (128, dim),
              "adaln_single.linear.weight": (6 * dim, dim),
              "caption_projection.linear_1.weight": (dim, 4096)}
    for i in range(layers):
        shapes[f"transformer_blocks.{i}.attn1.q_norm.weight"] = (dim,)
        shapes[f"transformer_blocks.{i}.attn2.to_k.weight"] = (dim, dim)
    desc = describe(shapes, "ltxv")
    assert desc.detection.layout == "original"
    assert desc.config["num_attention_heads"] == 32
    assert desc.config["attention_head_dim"] == head_dim
    assert label in desc.variant


def test_ltx_2_is_named_not_built():
    shapes = {k: tuple(v.shape) for k, v in build(next(iter(VARIANTS))).state_dict().items()}
    orig = LTX.convert(shapes, "diffusers", "original", ShapeOps())
    orig["audio_patchify_proj.weight"] = (64, 128)
    with pytest.raises(UnknownModelError, match="LTX-2.*audio_patchify_proj"):
        describe(orig, "ltxv")
