"""The Mochi transformer family: layouts and inferred config."""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import MochiTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_mochi_transformer_checkpoint_to_diffusers,
)
from family_checks import (  # noqa: E402
    check_against_diffusers_converter,
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import ModelLoadError  # noqa: E402
from ggufvideo.models import ShapeOps, describe, families, get_family  # noqa: E402
from ggufvideo.models.tensors import TensorOps  # noqa: E402

MOCHI = get_family("mochi")

# Tiny widths; rows of 32 so weights quantize. diffusers' converter knows 48 layers only.
TINY = dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, pooled_projection_dim=32,
            in_channels=4, text_embed_dim=32, time_embed_dim=32)


def build(num_layers: int, **extra) -> MochiTransformer3DModel:
    torch.manual_seed(0)
    return MochiTransformer3DModel(**TINY, num_layers=num_layers, **extra)


@pytest.fixture(scope="module")
def sd48():
    return random_state_dict(build(48))


def test_original_layout_matches_diffusers_converter(sd48):
    check_against_diffusers_converter(MOCHI, "original", sd48,
                                      convert_mochi_transformer_checkpoint_to_diffusers)


def test_last_block_and_swapped_halves(sd48):
    orig = MOCHI.convert(sd48, "diffusers", "original", TensorOps())
    last = "transformer_blocks.47"
    assert torch.equal(orig["blocks.47.mod_y.weight"],
                       sd48[f"{last}.norm1_context.linear_1.weight"])
    assert not any(k.startswith(("blocks.47.mlp_y", "blocks.47.attn.proj_y")) for k in orig)
    w = sd48["transformer_blocks.0.ff.net.0.proj.weight"]
    half = w.shape[0] // 2
    assert torch.equal(orig["blocks.0.mlp_x.w1.weight"], torch.cat([w[half:], w[:half]]))
    q = sd48["transformer_blocks.3.attn1.add_q_proj.weight"]
    assert torch.equal(orig["blocks.3.attn.qkv_y.weight"][:q.shape[0]], q)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("num_layers,extra", [(1, {}), (3, {}),
                                              (2, dict(out_channels=8, max_sequence_length=256))])
def test_config_inferred_from_shapes(num_layers, extra, layout):
    model = build(num_layers, **extra)
    config = check_config_inference(MOCHI, model, layout, "mochi")
    assert config["num_layers"] == num_layers
    # and any layer count converts both ways
    sd = random_state_dict(model)
    there = MOCHI.convert(sd, "diffusers", "original", TensorOps())
    back = MOCHI.convert(there, "original", "diffusers", TensorOps())
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_no_other_family_claims_these_names(layout):
    shapes = {k: tuple(v.shape) for k, v in build(2).state_dict().items()}
    keys = set(MOCHI.convert(shapes, "diffusers", layout, ShapeOps()))
    claims = [(f.name, f.layout_of(keys)) for f in families().values() if f.layout_of(keys)]
    assert claims == [("mochi", layout)]


def test_quantized_weights_convert_exactly_both_ways():
    sd = random_state_dict(build(3))
    assert check_exact_row_splits(MOCHI, "original", sd) > 10


@pytest.mark.parametrize("layout,drop,named", [
    ("diffusers", "pos_frequencies", "pos_frequencies"),
    ("original", "pos_frequencies", "pos_frequencies"),
    ("original", "t5_yproj.weight", "time_embed.caption_proj.weight"),
    ("original", "final_layer.linear.weight", "proj_out.weight"),
])
def test_missing_tensor_is_named(layout, drop, named):
    shapes = {k: tuple(v.shape) for k, v in build(2).state_dict().items()}
    renamed = MOCHI.convert(shapes, "diffusers", layout, ShapeOps())
    del renamed[drop]
    with pytest.raises(ModelLoadError, match=re.escape(named)):
        describe({"model.diffusion_model." + k: v for k, v in renamed.items()})


def test_released_shapes():
    with torch.device("meta"):
        model = MochiTransformer3DModel()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    orig = MOCHI.convert(shapes, "diffusers", "original", ShapeOps())
    desc = describe(orig)
    assert desc.detection.layout == "original" and desc.variant == "Mochi 1 (10B)"
    assert {k: desc.config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers",
                                        "pooled_projection_dim", "in_channels")} == \
        dict(num_attention_heads=24, attention_head_dim=128, num_layers=48,
             pooled_projection_dim=1536, in_channels=12)
