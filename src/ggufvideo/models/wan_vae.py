"""Wan VAEs (``AutoencoderKLWan``): Wan 2.1's (16 latent channels, also used by Wan 2.2's A14B
models) and Wan 2.2's TI2V-5B VAE (48 latent channels, 2x2 patchified pixels, residual down/up
blocks, a wider decoder).

Layouts: diffusers', and the original release's names in two variants, because the two releases
are two different module trees. ``"original"`` is Wan 2.1's (``encoder.downsamples.N`` one flat
list, ``decoder.upsamples.N`` one flat list, ``residual.0/2/3/6``, ``middle.0/1/2``,
``head.0/2``, top-level ``conv1``/``conv2``) -- the names diffusers' single-file converter
handles. ``"original-2.2"`` is Wan 2.2's, whose stages nest their layers
(``encoder.downsamples.S.downsamples.N``, ``decoder.upsamples.S.upsamples.N``; the stage's last
layer is its resampler); diffusers' single-file converter does not handle those names (its
conversion script for the 2.2 release does, and is what the rules follow). ComfyUI's files use the
original names. The two original layouts cannot be one: the same diffusers decoder layer has a
different original name in each.

Not in any shape, so the released models' values are used:

* ``num_res_blocks`` 2 in the original layouts: a resampler's index inside the flat (2.1) or
  nested (2.2) list depends on it, and the rules are fixed tables (it is read from the blocks in
  diffusers' layout).
* ``attn_scales`` ``[]`` (no attention outside the middle blocks).
* ``latents_mean`` / ``latents_std``: the released statistics for 16 and 48 latent channels
  (diffusers' defaults and the Wan 2.2 release's); other widths get none.
* ``patch_size``: the pixel input is 3 colour channels, so ``in_channels = 3 * patch**2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ModelLoadError
from .base import Family, Rule, Shapes, rename

#: Residual blocks per stage of every released Wan VAE (fixes resampler indices, see above).
NUM_RES_BLOCKS = 2
#: Stages the Wan 2.1 decoder table covers (released models have 4).
MAX_STAGES = 8

LATENTS_16 = (
    [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
     0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
     1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
)
LATENTS_48 = (
    [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
     0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
     0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
     -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
     0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
    [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894,
     1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146,
     0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709,
     0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537,
     0.5444, 0.4089, 0.7468, 0.7744],
)
_LATENTS = {16: LATENTS_16, 48: LATENTS_48}


def _resnet(orig: str, diff: str) -> list[Rule]:
    """A residual block: the original's ``residual`` Sequential vs diffusers' named layers."""
    return [rename(f"{orig}.residual.0.gamma", f"{diff}.norm1.gamma"),
            rename(f"{orig}.residual.2.*", f"{diff}.conv1.*"),
            rename(f"{orig}.residual.3.gamma", f"{diff}.norm2.gamma"),
            rename(f"{orig}.residual.6.*", f"{diff}.conv2.*"),
            rename(f"{orig}.shortcut.*", f"{diff}.conv_shortcut.*")]


def _shared() -> list[Rule]:
    """Names both releases share: latent convs, stems, middle blocks, heads."""
    rules = [rename("conv1.*", "quant_conv.*"), rename("conv2.*", "post_quant_conv.*")]
    for part in ("encoder", "decoder"):
        rules += [rename(f"{part}.conv1.*", f"{part}.conv_in.*"),
                  *_resnet(f"{part}.middle.0", f"{part}.mid_block.resnets.0"),
                  *_resnet(f"{part}.middle.2", f"{part}.mid_block.resnets.1"),
                  rename(f"{part}.middle.1.*", f"{part}.mid_block.attentions.0.*"),
                  rename(f"{part}.head.0.gamma", f"{part}.norm_out.gamma"),
                  rename(f"{part}.head.2.*", f"{part}.conv_out.*")]
    return rules


def _rules_21() -> tuple[Rule, ...]:
    """Wan 2.1: both sides keep the encoder's flat layer list; the decoder's flat list (per stage
    ``NUM_RES_BLOCKS + 1`` residual blocks, then a resampler) is diffusers' ``up_blocks``."""
    rules = [*_shared(), *_resnet("encoder.downsamples.{i}", "encoder.down_blocks.{i}"),
             rename("encoder.downsamples.{i}.*", "encoder.down_blocks.{i}.*")]
    per_stage = NUM_RES_BLOCKS + 2
    for s in range(MAX_STAGES):
        for j in range(NUM_RES_BLOCKS + 1):
            rules += _resnet(f"decoder.upsamples.{s * per_stage + j}",
                             f"decoder.up_blocks.{s}.resnets.{j}")
        rules.append(rename(f"decoder.upsamples.{s * per_stage + per_stage - 1}.*",
                            f"decoder.up_blocks.{s}.upsamplers.0.*"))
    return tuple(rules)


def _rules_22() -> tuple[Rule, ...]:
    """Wan 2.2: each stage nests its residual blocks and, last, its resampler."""
    return (*_shared(),
            *_resnet("encoder.downsamples.{s}.downsamples.{j}",
                     "encoder.down_blocks.{s}.resnets.{j}"),
            rename(f"encoder.downsamples.{{s}}.downsamples.{NUM_RES_BLOCKS}.*",
                   "encoder.down_blocks.{s}.downsampler.*"),
            *_resnet("decoder.upsamples.{s}.upsamples.{j}", "decoder.up_blocks.{s}.resnets.{j}"),
            rename(f"decoder.upsamples.{{s}}.upsamples.{NUM_RES_BLOCKS + 1}.*",
                   "decoder.up_blocks.{s}.upsampler.*"))


def _encoder_stages(s: Shapes, residual: bool) -> tuple[list[int], list[bool], int]:
    """Each encoder stage's width, whether each downsampling also halves time, blocks per stage."""
    widths: list[int]
    temporal: list[bool]
    if residual:
        n = s.count("encoder.down_blocks.{i}.*")
        widths = [s.require(f"encoder.down_blocks.{i}.resnets.0.conv1.weight",
                            f"the width of encoder stage {i}", ndim=5)[0] for i in range(n)]
        temporal = [s.has(f"encoder.down_blocks.{i}.downsampler.time_conv.weight")
                    for i in range(n - 1)]
        return widths, temporal, s.count("encoder.down_blocks.0.resnets.{j}.*")
    # Wan 2.1: one flat list -- residual blocks (conv1), resamplers (resample.1) end a stage
    widths, temporal, blocks, width = [], [], [0], 0
    for i in range(s.count("encoder.down_blocks.{i}.*")):
        b = f"encoder.down_blocks.{i}"
        if s.has(f"{b}.conv1.weight"):
            width = s[f"{b}.conv1.weight"][0]
            blocks[-1] += 1
        elif s.has(f"{b}.resample.1.weight"):
            widths.append(width)
            temporal.append(s.has(f"{b}.time_conv.weight"))
            blocks.append(0)
    if not width:
        s.require("encoder.down_blocks.0.conv1.weight", "the encoder's stages")
    widths.append(width)
    return widths, temporal, blocks[0]


def infer_config(s: Shapes) -> dict[str, Any]:
    """diffusers' ``AutoencoderKLWan`` config from the tensors' shapes."""
    base_dim, in_channels = s.require("encoder.conv_in.weight", "the base width and input "
                                      "channels", ndim=5)[:2]
    z_dim = s.require("post_quant_conv.weight", "the latent channels", ndim=5)[0]
    out_channels = s.require("decoder.conv_out.weight", "the output channels", ndim=5)[0]
    decoder_top = s.require("decoder.conv_in.weight", "the decoder width", ndim=5)[0]
    residual = s.any("encoder.down_blocks.{i}.resnets.*")
    widths, temporal, num_res_blocks = _encoder_stages(s, residual)
    if any(w <= 0 or w % base_dim for w in widths):
        raise ModelLoadError(f"encoder stage widths {widths} are not multiples of the base width "
                             f"{base_dim}", path=s.source, tensor="encoder.conv_in.weight")
    dim_mult = [w // base_dim for w in widths]
    decoder_base_dim = decoder_top // dim_mult[-1]
    patch = math.isqrt(in_channels // 3)
    patch_size = patch if in_channels != 3 and 3 * patch * patch == in_channels else None
    config: dict[str, Any] = {
        "base_dim": base_dim,
        "decoder_base_dim": None if decoder_base_dim == base_dim else decoder_base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temporal,
        "is_residual": residual,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "patch_size": patch_size,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** (len(dim_mult) - 1) * (patch_size or 1),
    }
    if z_dim in _LATENTS:
        config["latents_mean"], config["latents_std"] = (list(v) for v in _LATENTS[z_dim])
    return config


def class_name(config: Mapping[str, Any]) -> str:
    return "AutoencoderKLWan"


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    z = config["z_dim"]
    factors = f"{config['scale_factor_spatial']}x{config['scale_factor_temporal']}"
    if config["is_residual"]:
        name = "Wan 2.2 VAE (TI2V-5B)" if z == 48 else "Wan 2.2-style VAE"
    else:
        name = "Wan 2.1 VAE (Wan 2.1, Wan 2.2 A14B)" if z == 16 else "Wan 2.1-style VAE"
    return f"{name}, z{z}, {factors} compression"


def release_layout(config: Mapping[str, Any]) -> str:
    """Wan 2.2's VAE (residual blocks) was released with other names than Wan 2.1's."""
    return "original-2.2" if config.get("is_residual") else "original"


FAMILY: Family[Any] = Family(
    name="wan-vae",
    title="Wan 2.1/2.2 VAE",
    kind="vae",
    architectures=("wan-vae", "wan_vae", "wanvae"),
    signatures={
        # the RMS norms' ``gamma`` and the fused to_qkv conv are this VAE's own
        "diffusers": (("decoder.mid_block.attentions.0.to_qkv.weight", "decoder.norm_out.gamma"),
                      ("encoder.mid_block.attentions.0.to_qkv.weight", "encoder.norm_out.gamma")),
        "original": (("decoder.middle.1.to_qkv.weight", "decoder.upsamples.0.residual.0.gamma"),
                     ("encoder.middle.1.to_qkv.weight", "encoder.downsamples.0.residual.0.gamma")),
        "original-2.2": (("decoder.middle.1.to_qkv.weight",
                          "decoder.upsamples.0.upsamples.0.residual.0.gamma"),
                         ("encoder.middle.1.to_qkv.weight",
                          "encoder.downsamples.0.downsamples.0.residual.0.gamma")),
    },
    rules={"original": _rules_21(), "original-2.2": _rules_22()},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
    release_layout=release_layout,
)
