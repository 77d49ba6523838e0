"""LTX-Video's causal video VAE (``AutoencoderKLLTXVideo``): the 0.9.0 VAE, the 0.9.1 one (a new
decoder with timestep conditioning and noise injection) and the 0.9.5+ one (also a new encoder:
blocks that change width in their downsamplers; 0.9.5 to 0.9.8).

Layouts: diffusers' and the release's, whose single-file checkpoints put ``vae.`` before every VAE
key. The release numbers every stage of the encoder and decoder in one flat list
(``encoder.down_blocks.N`` = a group of ``res_blocks``, a downsampler, or a width-changing resnet;
``decoder.up_blocks.N`` likewise), which diffusers regroups into blocks with ``resnets``,
``downsamplers.0``/``upsamplers.0``, ``conv_out``/``conv_in``. Which flat index is which depends
on the version, so each version is its own layout: ``original-0.9.0``, ``original-0.9.1`` and
``original`` (0.9.5 and later). Inside a resnet the release's ``conv_shortcut`` is diffusers'
``conv_shortcut.conv`` and ``norm3.norm`` is ``norm3``; the decoder's ``last_time_embedder`` /
``last_scale_shift_table`` are ``time_embedder`` / ``scale_shift_table``; the latent statistics
``per_channel_statistics.mean-of-means`` / ``std-of-means`` are ``latents_mean`` / ``latents_std``
(the release's other statistics have no diffusers tensor: :func:`ggufvideo.from_gguf` and
``load_model`` leave them out).

Config from shapes: the resnets give each block's width and depth, the down/upsamplers' rows the
downsampling kind and the decoder's channel-reducing upsample factor, ``per_channel_scale1`` the
noise injection, the decoder's ``time_embedder`` the timestep conditioning. Not in any shape:
whether an upsampler adds its residual (the released VAEs do exactly when they reduce channels,
which is assumed), causality (diffusers' defaults kept), and the pixel channels, taken as 3 (RGB),
from which the patch size follows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import Family, Rule, Shapes, rename

# Flat release index -> (diffusers' module, what it is): "g" a group of resnets, "r" one resnet,
# "p" a down/upsampler (same names inside).
_ENC_OLD = ("down_blocks.0 g", "down_blocks.0.downsamplers.0 p", "down_blocks.0.conv_out r",
            "down_blocks.1 g", "down_blocks.1.downsamplers.0 p", "down_blocks.1.conv_out r",
            "down_blocks.2 g", "down_blocks.2.downsamplers.0 p", "down_blocks.3 g", "mid_block g")
_ENC_095 = ("down_blocks.0 g", "down_blocks.0.downsamplers.0 p", "down_blocks.1 g",
            "down_blocks.1.downsamplers.0 p", "down_blocks.2 g", "down_blocks.2.downsamplers.0 p",
            "down_blocks.3 g", "down_blocks.3.downsamplers.0 p", "mid_block g")
_DEC_090 = ("mid_block g", "up_blocks.0 g", "up_blocks.1.upsamplers.0 p", "up_blocks.1 g",
            "up_blocks.2.conv_in r", "up_blocks.2.upsamplers.0 p", "up_blocks.2 g",
            "up_blocks.3.conv_in r", "up_blocks.3.upsamplers.0 p", "up_blocks.3 g")
_DEC_091 = ("mid_block g", "up_blocks.0.upsamplers.0 p", "up_blocks.0 g",
            "up_blocks.1.upsamplers.0 p", "up_blocks.1 g", "up_blocks.2.upsamplers.0 p",
            "up_blocks.2 g", "up_blocks.3.upsamplers.0 p", "up_blocks.3 g")


def _resnet(o: str, d: str) -> list[Rule]:
    return [rename(f"{o}.conv_shortcut.*", f"{d}.conv_shortcut.conv.*"),
            rename(f"{o}.norm3.norm.*", f"{d}.norm3.*"),
            rename(f"{o}.*", f"{d}.*")]


def _stages(part: str, flat: str, table: tuple[str, ...]) -> list[Rule]:
    """Rules of one encoder/decoder: single modules first, then the groups' catch-alls (diffusers'
    ``up_blocks.0.*`` must not take ``up_blocks.0.upsamplers.0.*`` first)."""
    single: list[Rule] = []
    groups: list[Rule] = []
    for n, entry in enumerate(table):
        module, what = entry.split()
        o, d = f"{part}.{flat}.{n}", f"{part}.{module}"
        if what == "g":
            groups += [*_resnet(f"{o}.res_blocks.{{j}}", f"{d}.resnets.{{j}}"),
                       rename(f"{o}.*", f"{d}.*")]
        elif what == "r":
            single += _resnet(o, d)
        else:
            single.append(rename(f"{o}.*", f"{d}.*"))
    return single + groups


_COMMON = (rename("per_channel_statistics.mean-of-means", "latents_mean"),
           rename("per_channel_statistics.std-of-means", "latents_std"),
           rename("decoder.last_time_embedder.*", "decoder.time_embedder.*"),
           rename("decoder.last_scale_shift_table", "decoder.scale_shift_table"))


def _layout(encoder: tuple[str, ...], decoder: tuple[str, ...]) -> tuple[Rule, ...]:
    return (*_COMMON, *_stages("encoder", "down_blocks", encoder),
            *_stages("decoder", "up_blocks", decoder))


RULES = {"original-0.9.0": _layout(_ENC_OLD, _DEC_090),
         "original-0.9.1": _layout(_ENC_OLD, _DEC_091),
         "original": _layout(_ENC_095, _DEC_091)}

#: 0.9.5 downsamplers: rows of the conv = output width / product of the strides.
_DOWNSAMPLE = {4: "spatial", 2: "temporal", 8: "spatiotemporal"}


def _resnet_width(s: Shapes, block: str, why: str) -> int:
    return s.require(f"{block}.resnets.0.conv1.conv.weight", why, ndim=5)[0]


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``AutoencoderKLLTXVideo`` config from the tensors' shapes."""
    conv_in = s.require("encoder.conv_in.conv.weight", "the patch size", ndim=5)
    patch = math.isqrt(conv_in[1] // 3)
    enc_out = s.require("encoder.conv_out.conv.weight", "the latent channels", ndim=5)
    n_down = s.count("encoder.down_blocks.{i}.*")
    enc = [f"encoder.down_blocks.{i}" for i in range(n_down)]
    widths = [_resnet_width(s, b, f"the width of {b}") for b in enc]
    after = [*widths[1:], enc_out[1]]  # the width each block hands on
    new_encoder = (not s.any("encoder.down_blocks.{i}.conv_out.*")
                   and any(a != w for a, w in zip(after, widths)))
    down_types = []
    for b, out in zip(enc, after):
        rows = s.get(f"{b}.downsamplers.0.conv.conv.weight")
        down_types.append(_DOWNSAMPLE.get(out // rows[0], "conv") if rows else "conv")
    n_up = s.count("decoder.up_blocks.{i}.*")
    dec = ["decoder.mid_block", *(f"decoder.up_blocks.{i}" for i in range(n_up))]
    factors = []
    for b in dec[1:]:
        up = s.get(f"{b}.upsamplers.0.conv.conv.weight")
        factors.append(up[1] * 8 // up[0] if up else 1)
    up_widths = [_resnet_width(s, b, f"the width of {b}") * f for b, f in zip(dec[1:], factors)]

    def rev(xs: list[Any]) -> list[Any]:
        return xs[::-1]

    return {
        "in_channels": 3,
        "out_channels": s.require("decoder.conv_out.conv.weight", "the output channels",
                                  ndim=5)[0] // (patch * patch),
        "latent_channels": enc_out[0] - 1,
        "patch_size": patch,
        "block_out_channels": widths + ([enc_out[1]] if new_encoder else []),
        "down_block_types": [("LTXVideo095DownBlock3D" if new_encoder
                              else "LTXVideoDownBlock3D")] * n_down,
        "layers_per_block": [s.count(f"{b}.resnets.{{j}}.*")
                             for b in (*enc, "encoder.mid_block")],
        "spatio_temporal_scaling": [s.any(f"{b}.downsamplers.*") for b in enc],
        "downsample_type": down_types,
        "decoder_block_out_channels": rev(up_widths),
        "decoder_layers_per_block": rev([s.count(f"{b}.resnets.{{j}}.*") for b in dec]),
        "decoder_spatio_temporal_scaling": rev([s.any(f"{b}.upsamplers.*") for b in dec[1:]]),
        "decoder_inject_noise": rev([s.has(f"{b}.resnets.0.per_channel_scale1") for b in dec]),
        "upsample_residual": rev([f > 1 for f in factors]),
        "upsample_factor": rev(factors),
        "timestep_conditioning": s.has("decoder.time_embedder.timestep_embedder.linear_1.weight"),
    }


def class_name(config: Mapping[str, Any]) -> str:
    return "AutoencoderKLLTXVideo"


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    if config["down_block_types"][0] == "LTXVideo095DownBlock3D":
        version = "0.9.5+"
    else:
        version = "0.9.1" if config["timestep_conditioning"] else "0.9.0"
    timestep = ", timestep-conditioned decoder" if config["timestep_conditioning"] else ""
    return f"{version}-style VAE ({config['latent_channels']} latent channels{timestep})"


def release_layout(config: Mapping[str, Any]) -> str:
    """The release whose names a VAE of this config was published with (as :func:`variant`)."""
    if config["down_block_types"][0] == "LTXVideo095DownBlock3D":
        return "original"
    return "original-0.9.1" if config["timestep_conditioning"] else "original-0.9.0"


FAMILY: Family[Any] = Family(
    name="ltx-video-vae",
    title="LTX-Video VAE",
    kind="vae",
    architectures=("ltxv-vae", "ltx-video-vae"),
    signatures={
        "diffusers": (("encoder.conv_in.conv.weight", "latents_mean", "latents_std"),
                      ("encoder.conv_in.conv.weight",
                       "encoder.down_blocks.0.conv_out.norm3.weight"),
                      ("decoder.conv_in.conv.weight", "decoder.timestep_scale_multiplier",
                       "decoder.time_embedder.timestep_embedder.linear_1.weight")),
        # the first match wins: the 0.9.0/0.9.1 encoders have a lone resnet at index 2, the
        # 0.9.0 decoder a group of resnets at index 1 where later ones have an upsampler
        "original-0.9.0": (("encoder.down_blocks.2.conv1.conv.weight",
                            "decoder.up_blocks.1.res_blocks.0.conv1.conv.weight"),),
        "original-0.9.1": (("encoder.down_blocks.2.conv1.conv.weight",
                            "decoder.up_blocks.1.conv.conv.weight"),),
        "original": (("encoder.down_blocks.2.res_blocks.0.conv1.conv.weight",
                      "decoder.up_blocks.1.conv.conv.weight"),),
    },
    rules=RULES,
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
    original_prefix="vae.",
    release_layout=release_layout,
    # the release's statistics module holds three more buffers diffusers' VAE has no place for
    unused=("per_channel_statistics.channel", "per_channel_statistics.mean-of-stds",
            "per_channel_statistics.mean-of-stds_over_std-of-means"),
)
