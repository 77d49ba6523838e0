"""Bake-in: LoRAs merged into a model's weights, requantized with the exact quantizer.

Used by ``ggufvideo convert SRC DST --lora FILE[:SCALE]`` (:func:`ggufvideo.convert`'s ``loras``)
and by :func:`ggufvideo.fuse_lora`. Each tensor a LoRA touches is decoded to float32, the LoRA
deltas (``scale * alpha / rank * up @ down``, ``diff``, ``diff_b``, a DoRA's rescaling) are
added in float32, and the sum is encoded again -- to the tensor's own type unless a type was
asked for -- with :func:`ggufvideo.quantize` (byte-identical to ggml's quantizer). Tensors no
LoRA touches are not decoded: a GGUF source's are copied byte for byte. The work stays
streaming: a touched tensor is merged when the writer reaches it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import LoraError, UnsupportedTypeError, _safe
from ..policy import QuantPolicy
from ..quants import get_quant_type, quantize
from ..tensor import GGMLTensor
from ..writer import SourceTensor
from .dora import check_plan
from .formats import LoraFile, read_lora
from .pieces import check_fits, dense_delta, needs_weight
from .targets import Piece, resolve

__all__ = ["merged_tensor", "bake_sources", "parse_lora_arg"]


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (the command line's ``--lora``) -> (file, scale).

    Raises:
        ValueError: a scale that is not a finite number (``nan``, ``inf``).
    """
    path, sep, scale = text.rpartition(":")
    if sep and path and not os.path.exists(text):
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise ValueError(f"{text}: the LoRA scale must be a finite number, not {scale}")
        return path, value
    return text, 1.0


def merged_tensor(old: torch.Tensor, delta: torch.Tensor, *, name: str = "",
                  qtype: Any = None) -> torch.Tensor:
    """``old`` + ``delta`` (float32), encoded as ``old`` was: a quantized ``old`` is decoded
    exactly, the delta added in float32 and requantized to ``qtype`` (default: its own type) with
    the exact quantizer; a plain one is rounded once to its dtype."""
    if isinstance(old, GGMLTensor):
        q = get_quant_type(qtype if qtype is not None else old.qtype).qtype
        w = old.dequantize(torch.float32) + delta.to(torch.float32)
        shape = tuple(old.shape)
        raw = quantize(w.reshape(-1, shape[-1]), q)
        if raw.numel() == old.raw.numel():
            raw = raw.reshape(old.raw.shape)
        return GGMLTensor(raw, q, shape, old.dtype)
    return (old.detach().to(torch.float32) + delta.to(old.device)).to(old.dtype)


def bake_sources(tensors: Sequence[SourceTensor],
                 loras: Sequence[tuple[str | os.PathLike[str] | Mapping[str, torch.Tensor]
                                       | LoraFile, float]],
                 policy: QuantPolicy, *, own_types: bool, architecture: str | None = None
                 ) -> tuple[list[SourceTensor], QuantPolicy, dict[str, list[str]]]:
    """The source tensors with LoRAs merged into the ones they touch.

    Args:
        tensors: the source's tensors (lazy).
        loras: (LoRA, scale) pairs, applied in order (their deltas add up).
        policy: the conversion's policy.
        own_types: a touched tensor that was quantized is requantized to its own type (no type was
            asked for); else the policy types it like any float tensor.
        architecture: the source's ``general.architecture`` (helps the name mapping).

    Returns:
        (tensors, policy with the per-tensor types, tensor name -> the LoRA files that changed it).

    Raises:
        LoraError: a LoRA key matching no tensor (names the file and key), shapes that do not fit,
            or a touched tensor whose own type cannot be quantized to.
    """
    shapes = {t.name: tuple(t.shape) for t in tensors}
    # name -> [(pieces, scale, is_bias, source)]
    plan: dict[str, list[tuple[list[Piece], float, bool, str]]] = {}
    for lora, scale in loras:
        lf = read_lora(lora)
        res = resolve(lf, shapes, architecture=architecture)
        res.check_matched(lf.source, "the source")
        res.warn_skipped(lf.source)
        check_fits(res, shapes, lf.source)  # every delta's shape, before anything is written
        for table, bias in ((res.weights, False), (res.biases, True)):
            for key, pieces in table.items():
                plan.setdefault(key, []).append((pieces, float(scale), bias, lf.source))
    overrides: list[tuple[str, str]] = []
    out: list[SourceTensor] = []
    changed: dict[str, list[str]] = {}
    for s in tensors:
        todo = plan.get(s.name)
        if not todo:
            out.append(s)
            continue
        check_plan(s.name, tuple(s.shape), [(p, src) for p, _, b, src in todo if not b])
        changed[s.name] = [src for *_, src in todo]
        if own_types and s.qtype is not None:
            qt = get_quant_type(s.qtype)
            if not qt.can_quantize:
                raise LoraError(f"tensor {_safe(s.name)} is {s.qtype.name}, which cannot be "
                                "quantized to: pass --type / qtype to choose the type the merged "
                                "weight is written as", path=todo[0][3])
            overrides.append((f"^{re.escape(s.name)}$", s.qtype.name))
        out.append(dataclasses.replace(s, load=_merged_loader(s, todo), qtype=None, tie=None))
    if overrides:
        try:
            policy = dataclasses.replace(policy, overrides=(*overrides, *policy.overrides),
                                         _compiled={})
        except UnsupportedTypeError as exc:
            raise LoraError(str(exc)) from None
    return out, policy, changed


def _merged_loader(s: SourceTensor, todo: list[tuple[list[Piece], float, bool, str]]):  # noqa: ANN202
    def load() -> torch.Tensor:
        t = s.load()
        if isinstance(t, GGMLTensor):
            out = t.dequantize(torch.float32)
        else:
            out = t.detach().to(torch.float32, copy=True)  # never add into the source's memory
        # A DoRA's delta depends on the weight: the source's own, not one another LoRA changed.
        base = out.clone() if any(needs_weight(p) for p, *_ in todo) else None
        for pieces, scale, bias, src in todo:
            out += scale * dense_delta(pieces, tuple(s.shape), src, bias=bias, weight=base)
        return out

    return load
