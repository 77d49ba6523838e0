"""The Wan VAE family: Wan 2.1 (z16) and Wan 2.2 (z48) layouts and inferred config."""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402
from family_checks import (  # noqa: E402
    check_against_diffusers_converter,
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import ModelLoadError  # noqa: E402
from ggufvideo.models import ShapeOps, describe, families, get_family  # noqa: E402
from ggufvideo.models.tensors import TensorOps  # noqa: E402
from ggufvideo.models.wan_vae import LATENTS_48  # noqa: E402

VAE = get_family("wan-vae")

# Tiny versions of the released VAEs (same stages, narrow channels).
WAN21 = dict(base_dim=8, z_dim=16)
WAN22 = dict(base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True, in_channels=12,
             out_channels=12, patch_size=2, scale_factor_spatial=16,
             latents_mean=LATENTS_48[0], latents_std=LATENTS_48[1])
# Not a released shape: 3 stages, one residual block each (diffusers' layout only, see wan_vae.py)
SMALL = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
             temperal_downsample=[True, False], scale_factor_temporal=2, scale_factor_spatial=4)
VARIANTS = {"2.1": (WAN21, "original", "Wan 2.1"), "2.2": (WAN22, "original-2.2", "Wan 2.2"),
            "small": (SMALL, None, "Wan 2.1-style")}


def build(name: str) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**VARIANTS[name][0])


def test_wan21_original_layout_matches_diffusers_converter():
    sd = random_state_dict(build("2.1"))
    check_against_diffusers_converter(VAE, "original", sd, convert_wan_vae_to_diffusers, prefix="")


def _wan22_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan 2.2's original names to diffusers', by string edits as diffusers' conversion script for
    that release does them (an independent reference: its single-file converter lacks them)."""
    out = {}
    for key, value in sd.items():
        k = key
        for a, b in ((".residual.0.", ".norm1."), (".residual.2.", ".conv1."),
                     (".residual.3.", ".norm2."), (".residual.6.", ".conv2."),
                     (".shortcut.", ".conv_shortcut.")):
            k = k.replace(a, b)
        k = re.sub(r"^(encoder|decoder)\.middle\.([02])\.",
                   lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.", k)
        k = re.sub(r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0.", k)
        k = re.sub(r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out.", k)
        k = re.sub(r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out.", k)
        k = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", k)
        k = re.sub(r"^conv1\.", "quant_conv.", k)
        k = re.sub(r"^conv2\.", "post_quant_conv.", k)
        for part, old, new in (("encoder", "downsamples", "down_blocks"),
                               ("decoder", "upsamples", "up_blocks")):
            sampler = "downsampler" if part == "encoder" else "upsampler"
            k = re.sub(rf"^{part}\.{old}\.(\d+)\.{old}\.\d+\.(resample|time_conv)\.",
                       rf"{part}.{new}.\1.{sampler}.\2.", k)
            k = re.sub(rf"^{part}\.{old}\.(\d+)\.{old}\.", rf"{part}.{new}.\1.resnets.", k)
        out[k] = value
    return out


def test_wan22_original_layout_matches_reference():
    sd = random_state_dict(build("2.2"))
    check_against_diffusers_converter(VAE, "original-2.2", sd, _wan22_to_diffusers, prefix="")
    orig = VAE.convert(sd, "diffusers", "original-2.2", TensorOps())
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in orig
    assert "decoder.upsamples.0.upsamples.3.resample.1.weight" in orig


@pytest.mark.parametrize("name,layout", [("2.1", "diffusers"), ("2.1", "original"),
                                         ("2.2", "diffusers"), ("2.2", "original-2.2"),
                                         ("small", "diffusers")])
def test_config_inferred_from_shapes(name, layout):
    model = build(name)
    config = check_config_inference(VAE, model, layout)
    assert set(config) >= {"base_dim", "z_dim", "dim_mult", "temperal_downsample", "is_residual",
                           "patch_size", "latents_mean"} - ({"latents_mean"} if name == "small"
                                                            else set())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = VAE.convert(shapes, "diffusers", layout, ShapeOps())
    for prefix in ("", "vae.", "first_stage_model."):
        desc = describe({prefix + k: v for k, v in renamed.items()})
        assert desc.detection.family is VAE and desc.detection.prefix == prefix
        assert desc.variant.startswith(VARIANTS[name][2])


@pytest.mark.parametrize("name,layout", [("2.1", "diffusers"), ("2.1", "original"),
                                         ("2.2", "diffusers"), ("2.2", "original-2.2")])
def test_no_other_family_or_layout_claims_these_names(name, layout):
    shapes = {k: tuple(v.shape) for k, v in build(name).state_dict().items()}
    keys = set(VAE.convert(shapes, "diffusers", layout, ShapeOps()))
    claims = [(f.name, f.layout_of(keys)) for f in families().values() if f.layout_of(keys)]
    assert claims == [("wan-vae", layout)]


@pytest.mark.parametrize("name", ["2.1", "2.2"])
def test_quantized_weights_convert_exactly_both_ways(name):
    # the VAE holds convolutions only and nothing splits: quantize their flattened rows, which
    # must pass through every rename unchanged, in blocks
    sd = random_state_dict(build(name))
    flat = {k: v.reshape(v.shape[0], -1) if v.dim() > 2 and v[0].numel() % 32 == 0 else v
            for k, v in sd.items()}
    assert check_exact_row_splits(VAE, VARIANTS[name][1], flat) > 10


@pytest.mark.parametrize("layout,drop,named", [
    ("diffusers", "post_quant_conv.weight", "post_quant_conv.weight"),
    ("original", "conv2.weight", "post_quant_conv.weight"),
    ("original", "encoder.conv1.weight", "encoder.conv_in.weight"),
    ("original-2.2", "encoder.downsamples.2.downsamples.0.residual.2.weight",
     "encoder.down_blocks.2.resnets.0.conv1.weight"),
])
def test_missing_tensor_is_named(layout, drop, named):
    model = build("2.2" if layout == "original-2.2" else "2.1")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = VAE.convert(shapes, "diffusers", layout, ShapeOps())
    del renamed[drop]
    with pytest.raises(ModelLoadError, match=re.escape(named)):
        describe(renamed)


def test_released_shapes_infer_released_configs():
    for config, z, spatial in ((dict(), 16, 8), (dict(base_dim=160, decoder_base_dim=256,
                                                      z_dim=48, is_residual=True, in_channels=12,
                                                      out_channels=12, patch_size=2), 48, 16)):
        with torch.device("meta"):
            model = AutoencoderKLWan(**config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        desc = describe(shapes)
        assert desc.config["z_dim"] == z and desc.config["scale_factor_spatial"] == spatial
        assert desc.config["temperal_downsample"] == [False, True, True]
        assert desc.config["dim_mult"] == [1, 2, 4, 4] and desc.config["num_res_blocks"] == 2
        assert len(desc.config["latents_mean"]) == z
