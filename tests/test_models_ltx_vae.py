"""The LTX-Video VAE family: each release version's layout against diffusers' converter, inferred
config."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLLTXVideo  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ltx_vae_checkpoint_to_diffusers  # noqa: E402
from family_checks import (  # noqa: E402
    check_against_diffusers_converter,
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import ModelLoadError  # noqa: E402
from ggufvideo.models import ShapeOps, describe, get_family  # noqa: E402

LVAE = get_family("ltx-video-vae")

# Tiny versions of each release's structure (same block layout, narrow blocks, one resnet each).
V090 = dict(latent_channels=8, block_out_channels=(8, 16, 32, 32),
            decoder_block_out_channels=(8, 16, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1))
# 0.9.1: the same encoder; a decoder whose upsamplers halve the width, with timestep
# conditioning and noise injection
DEC_NEW = dict(decoder_block_out_channels=(8, 16, 32, 64), decoder_layers_per_block=(1, 2, 1, 1, 1),
               decoder_spatio_temporal_scaling=(True, True, True, True),
               decoder_inject_noise=(True, True, True, True, False),
               upsample_residual=(True, True, True, True), upsample_factor=(2, 2, 2, 2),
               timestep_conditioning=True)
V091 = {**V090, **DEC_NEW}
# 0.9.5: a new encoder (the last width 2048 is how diffusers' converter tells this version; the
# mid block has no resnets to keep it small)
V095 = {**V091, "block_out_channels": (8, 16, 32, 64, 2048),
        "down_block_types": ("LTXVideo095DownBlock3D",) * 4,
        "layers_per_block": (1, 2, 1, 1, 0), "spatio_temporal_scaling": (True, True, True, True),
        "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal")}
VARIANTS = {
    "0.9.0": (V090, "original-0.9.0", "0.9.0"),
    "0.9.1": (V091, "original-0.9.1", "0.9.1"),
    "0.9.5": (V095, "original", "0.9.5+"),
    "0.9.5-no-timestep": ({**V095, "timestep_conditioning": False,
                           "decoder_inject_noise": (False,) * 5}, "original", "0.9.5+"),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoencoderKLLTXVideo(**VARIANTS[name][0])


@pytest.mark.parametrize("name", VARIANTS)
def test_original_layout_matches_diffusers_converter(name):
    _, layout, _ = VARIANTS[name]
    check_against_diffusers_converter(LVAE, layout, random_state_dict(build(name)),
                                      convert_ltx_vae_checkpoint_to_diffusers, prefix="vae.")


@pytest.mark.parametrize("which", ["diffusers", "original"])
@pytest.mark.parametrize("name", VARIANTS)
def test_config_inferred_from_shapes(name, which):
    _, layout, label = VARIANTS[name]
    model = build(name)
    check_config_inference(LVAE, model, layout if which == "original" else "diffusers")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert describe(shapes).variant.startswith(label)


def test_release_prefix_is_detected():
    shapes = {k: tuple(v.shape) for k, v in build("0.9.5").state_dict().items()}
    orig = LVAE.convert(shapes, "diffusers", "original", ShapeOps())
    desc = describe({f"vae.{k}": v for k, v in orig.items()})
    assert desc.detection.family is LVAE and desc.detection.prefix == "vae."
    assert desc.detection.layout == "original"


def test_quantized_weights_convert_exactly_both_ways():
    sd = random_state_dict(build("0.9.1"))
    assert check_exact_row_splits(LVAE, "original-0.9.1", sd) > 0


@pytest.mark.parametrize("name,layout,drop,named", [
    ("0.9.0", "diffusers", "encoder.conv_out.conv.weight", "encoder.conv_out.conv.weight"),
    ("0.9.1", "original-0.9.1", "decoder.up_blocks.4.res_blocks.0.conv1.conv.weight",
     "decoder.up_blocks.1.resnets.0.conv1.conv.weight"),
    ("0.9.5", "original", "encoder.down_blocks.4.res_blocks.0.conv1.conv.weight",
     "encoder.down_blocks.2.resnets.0.conv1.conv.weight"),
])
def test_missing_tensor_is_named(name, layout, drop, named):
    shapes = {k: tuple(v.shape) for k, v in build(name).state_dict().items()}
    renamed = LVAE.convert(shapes, "diffusers", layout, ShapeOps())
    del renamed[drop]
    with pytest.raises(ModelLoadError, match=named.replace(".", r"\.")):
        describe(renamed)


def test_the_releases_other_statistics_are_left_out(tmp_path):
    """The release's VAE also stores ``channel``, ``mean-of-stds`` and their ratio, which
    diffusers' VAE has no place for: from_gguf and load_model leave them out."""
    import ggufvideo
    from ggufvideo import save_state_dict

    model = build("0.9.5")
    from ggufvideo.models.tensors import TensorOps

    sd = LVAE.convert(model.state_dict(), "diffusers", "original", TensorOps())
    n = model.latents_mean.shape[0]
    for extra in ("channel", "mean-of-stds", "mean-of-stds_over_std-of-means"):
        sd[f"per_channel_statistics.{extra}"] = torch.rand(n)
    path = tmp_path / "ltx_vae.gguf"
    save_state_dict({f"vae.{k}": v.contiguous() for k, v in sd.items()}, path)
    built = ggufvideo.from_gguf(path)
    assert torch.equal(built.latents_mean, model.latents_mean)
    ggufvideo.load_model(build("0.9.5"), path)  # strict, and no "unexpected keys"
