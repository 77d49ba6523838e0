"""Checks every model family's tests run: layouts against diffusers' own converters, config
inference against the config a tiny model was built from, exact row splits of quantized tensors.

diffusers' ``single_file_utils.convert_*_to_diffusers`` functions are the reference for every
original -> diffusers map (used here at test time only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from model_files import quantize_rows

from ggufvideo import GGMLTensor
from ggufvideo.models import CANONICAL, Family, ShapeOps, describe
from ggufvideo.models.tensors import TensorOps


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with distinct random values (so a swapped tensor is caught)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def check_against_diffusers_converter(family: Family[Any], layout: str,
                                      diffusers_sd: Mapping[str, torch.Tensor],
                                      convert: Callable[[dict[str, torch.Tensor]], dict],
                                      prefix: str = "model.diffusion_model.",
                                      not_converted_by_diffusers: tuple[str, ...] = ()) -> None:
    """diffusers -> ``layout`` by our rules, then back by diffusers' converter: same keys, same
    bits; and our own way back gives the same as diffusers'."""
    ops = TensorOps()
    other = family.convert(diffusers_sd, CANONICAL, layout, ops)
    theirs = convert({prefix + k: v.clone() for k, v in other.items()})
    skip = set(not_converted_by_diffusers)
    for k in diffusers_sd:
        if k in skip:
            continue
        assert k in theirs, f"diffusers' converter did not produce {k}"
        assert torch.equal(theirs[k], diffusers_sd[k]), f"{k} differs after diffusers' converter"
    # what diffusers leaves unconverted is exactly the keys it does not know
    left = family.convert({k: tuple(diffusers_sd[k].shape) for k in skip}, CANONICAL, layout,
                          ShapeOps())
    extra = {k.removeprefix(prefix) for k in set(theirs) - set(diffusers_sd)}
    assert extra == set(left), f"diffusers' converter left {sorted(extra - set(left))[:10]}"
    ours = family.convert(other, layout, CANONICAL, ops)
    assert set(ours) == set(diffusers_sd)
    for k, v in diffusers_sd.items():
        assert torch.equal(ours[k], v), k


def check_config_inference(family: Family[Any], model: torch.nn.Module, layout: str,
                           architecture: str | None = None,
                           ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """``describe`` on the model's tensors (renamed to ``layout``) infers the config the model was
    built with (every key the inference returns), and that config builds the same shapes."""
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    renamed = family.convert(shapes, CANONICAL, layout, ShapeOps())
    desc = describe(renamed, architecture)
    assert desc.detection.family is family, desc.detection.family.name
    assert desc.detection.layout == layout
    config = dict(model.config)
    for k, v in desc.config.items():
        if k in ignore or k not in config:
            continue
        want = config[k]
        if isinstance(want, (tuple, list)):
            want, v = list(want), list(v)
        assert v == want, f"{k}: inferred {v!r}, model has {want!r}"
    assert desc.class_name == type(model).__name__
    rebuilt = type(model).from_config({**config, **desc.config})
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    return desc.config


def quantized(t: torch.Tensor, qtype: T = T.Q8_0) -> GGMLTensor:
    """A 2-D float tensor as a GGMLTensor of ``qtype`` (rows must be whole blocks)."""
    x = t.detach().float().numpy().reshape(t.shape[0], -1)
    raw = torch.from_numpy(np.ascontiguousarray(quantize_rows(x, qtype)))
    return GGMLTensor(raw, qtype, tuple(t.shape))


def check_exact_row_splits(family: Family[Any], layout: str, sd: Mapping[str, torch.Tensor],
                           qtype: T = T.Q8_0) -> int:
    """Quantized weights converted between diffusers and ``layout`` (both ways) stay quantized,
    and decode to exactly the converted decoded values. Returns how many weights were checked."""
    ops = TensorOps()
    q = {k: quantized(v, qtype) if v.dim() == 2 and v.shape[-1] % 32 == 0 else v
         for k, v in sd.items()}
    decoded = {k: v.dequantize() if isinstance(v, GGMLTensor) else v for k, v in q.items()}
    there = family.convert(q, CANONICAL, layout, ops)
    there_decoded = family.convert(decoded, CANONICAL, layout, ops)
    n = 0
    for k, v in there.items():
        if isinstance(v, GGMLTensor):
            n += 1
            assert torch.equal(v.dequantize(), there_decoded[k]), k
    back = family.convert(there, layout, CANONICAL, ops)
    for k, v in q.items():
        assert type(back[k]) is type(v), k
        if isinstance(v, GGMLTensor):
            assert torch.equal(back[k].raw, v.raw), k
    return n
