"""The HunyuanVideo VAE family: detection and config inferred from shapes (diffusers' layout only;
diffusers has no single-file converter for it, and there is no other layout to convert)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLHunyuanVideo  # noqa: E402
from family_checks import check_config_inference  # noqa: E402

from ggufvideo.errors import ModelLoadError  # noqa: E402
from ggufvideo.models import describe, detect, get_family  # noqa: E402

HVAE = get_family("hunyuan-video-vae")

# Tiny configs (4 groups per GroupNorm instead of the release's 32: the count is in no shape).
BASE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, layers_per_block=1, norm_num_groups=4)
VARIANTS = {
    "release-shape": BASE,
    "two-blocks-no-attention": {**BASE, "block_out_channels": (8, 16),
                                "down_block_types": ("HunyuanVideoDownBlock3D",) * 2,
                                "up_block_types": ("HunyuanVideoUpBlock3D",) * 2,
                                "spatial_compression_ratio": 4, "layers_per_block": 2,
                                "mid_block_add_attention": False, "latent_channels": 8},
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(**VARIANTS[name])


@pytest.mark.parametrize("name", VARIANTS)
def test_config_inferred_from_shapes(name):
    config = check_config_inference(HVAE, build(name), "diffusers")
    assert config["block_out_channels"] == list(VARIANTS[name]["block_out_channels"])


def test_container_prefix_detected():
    keys = [f"vae.{k}" for k in build("release-shape").state_dict()]
    det = detect(keys)
    assert det is not None and det.family is HVAE and det.prefix == "vae."


@pytest.mark.parametrize("drop", ["decoder.conv_out.conv.weight",
                                  "encoder.down_blocks.2.resnets.0.conv1.conv.weight"])
def test_missing_tensor_is_named(drop):
    shapes = {k: tuple(v.shape) for k, v in build("release-shape").state_dict().items()}
    del shapes[drop]
    with pytest.raises(ModelLoadError, match=drop.replace(".", r"\.")):
        describe(shapes)


def test_release_sizes():
    shapes = {"encoder.conv_in.conv.weight": (128, 3, 3, 3, 3),
              "encoder.conv_norm_out.weight": (512,), "decoder.conv_norm_out.weight": (128,),
              "decoder.conv_in.conv.weight": (512, 16, 3, 3, 3),
              "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
              "quant_conv.weight": (32, 32, 1, 1, 1), "post_quant_conv.weight": (16, 16, 1, 1, 1),
              "encoder.mid_block.attentions.0.to_q.weight": (512, 512)}
    for i, ch in enumerate((128, 256, 512, 512)):
        for j in range(2):
            shapes[f"encoder.down_blocks.{i}.resnets.{j}.conv1.conv.weight"] = (ch, ch, 3, 3, 3)
        if i < 3:
            shapes[f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight"] = (ch, ch, 3, 3, 3)
    desc = describe(shapes)
    assert desc.config["spatial_compression_ratio"] == 8
    assert desc.config["layers_per_block"] == 2
    assert desc.config["latent_channels"] == 16
    assert "HunyuanVideo VAE" in desc.variant
