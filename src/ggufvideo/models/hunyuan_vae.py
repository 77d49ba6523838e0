"""HunyuanVideo's causal 3-D VAE (``AutoencoderKLHunyuanVideo``).

Layout: diffusers' only. The release's VAE checkpoint is rarely shared in other names, and
diffusers has no single-file converter for it, so there is nothing to check another layout
against.

Config from shapes: the blocks' resnets give ``block_out_channels`` and ``layers_per_block``, the
encoder's input and the decoder's output convolutions the pixel channels, the decoder's input
convolution the latent channels, the mid-block attention whether there is one. The number of
blocks that downsample gives the spatial compression (8 in the release: three of its four blocks
downsample). Not in any shape: the GroupNorm group count (32 in the release, diffusers' default)
and the temporal compression (4, the only one diffusers' decoder builds); both are left at
diffusers' defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family, Shapes


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``AutoencoderKLHunyuanVideo`` config from the tensors' shapes."""
    in_channels = s.require("encoder.conv_in.conv.weight", "the input channels", ndim=5)[1]
    n_blocks = s.count("encoder.down_blocks.{i}.*")
    if n_blocks == 0:
        s.require("encoder.down_blocks.0.resnets.0.conv1.conv.weight", "the encoder's blocks")
    block_out = [s.require(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight",
                           f"the width of encoder block {i}", ndim=5)[0]
                 for i in range(n_blocks)]
    layers = s.count("encoder.down_blocks.0.resnets.{j}.*")
    latent = s.require("decoder.conv_in.conv.weight", "the latent channels", ndim=5)[1]
    out_channels = s.require("decoder.conv_out.conv.weight", "the output channels", ndim=5)[0]
    s.require("quant_conv.weight", "the latent channels of the posterior", ndim=5)
    n_down = sum(s.any(f"encoder.down_blocks.{i}.downsamplers.*") for i in range(n_blocks))
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "latent_channels": latent,
        "down_block_types": ["HunyuanVideoDownBlock3D"] * n_blocks,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * n_blocks,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "spatial_compression_ratio": 2 ** n_down,
        "mid_block_add_attention": s.has("encoder.mid_block.attentions.0.to_q.weight"),
    }


def class_name(config: Mapping[str, Any]) -> str:
    return "AutoencoderKLHunyuanVideo"


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    if (list(config["block_out_channels"]), config["latent_channels"]) == ([128, 256, 512, 512],
                                                                           16):
        return "HunyuanVideo VAE (16 latent channels, 8x spatial, 4x temporal)"
    return (f"{config['latent_channels']} latent channels, blocks "
            f"{list(config['block_out_channels'])}")


FAMILY: Family[Any] = Family(
    name="hunyuan-video-vae",
    title="HunyuanVideo VAE",
    kind="vae",
    architectures=("hyvid-vae", "hunyuan-video-vae"),
    signatures={
        "diffusers": (("encoder.conv_in.conv.weight", "encoder.conv_norm_out.weight",
                       "decoder.conv_norm_out.weight", "decoder.conv_in.conv.weight",
                       "quant_conv.weight", "post_quant_conv.weight"),),
    },
    rules={},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
)
