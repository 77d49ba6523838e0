"""Renaming a source's tensors into another layout of its model family, still lazily.

The converter streams: it knows every tensor's name and shape before reading data. Renaming keeps
that: each output tensor is a :class:`~ggufvideo.writer.SourceTensor` whose ``load`` loads the
source tensor(s) it comes from and splits or joins rows (exact; quantized sources move raw blocks
and are written as they are when their type stays).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from gguf import GGUFValueType

from ..errors import ModelLoadError, _safe
from ..models import CANONICAL, Detection, ShapeOps, Shapes, detect, known_families
from ..models.tensors import cat_rows, permute_rows, split_rows, swap_halves
from ..serialize import _SCALAR_FMT, RawValue
from ..writer import SourceTensor

__all__ = ["SourceOps", "relayout", "LAYOUTS", "source_config"]

#: The layout names every family with an original release layout has (some families have more,
#: e.g. one per release of a VAE whose names changed: ``original-0.9.0``).
LAYOUTS = ("original", CANONICAL)


def _keeps_qtype(shape: tuple[int, ...]) -> bool:
    return 2 <= len(shape) <= 4  # rows of whole blocks: splits and joins move raw bytes


def _split_part(v: SourceTensor, sizes: Sequence[int], i: int) -> torch.Tensor:
    return split_rows(v.load(), list(sizes))[i]


class SourceOps:
    """:class:`~ggufvideo.models.ValueOps` over lazy source tensors."""

    def rows(self, v: SourceTensor) -> int:
        return int(v.shape[0])

    def split(self, v: SourceTensor, sizes: Sequence[int]) -> list[SourceTensor]:
        out, total = [], max(1, int(v.shape[0]))
        for i, n in enumerate(sizes):
            shape = (int(n), *v.shape[1:])
            keep = v.qtype is not None and _keeps_qtype(shape)
            out.append(SourceTensor(
                v.name, shape, v.dtype if keep or v.qtype is None else torch.float32,
                functools.partial(_split_part, v, sizes, i),
                v.qtype if keep else None, v.nbytes * int(n) // total, None, v.release))
        return out

    def cat(self, vs: Sequence[SourceTensor]) -> SourceTensor:
        shape = (sum(int(v.shape[0]) for v in vs), *vs[0].shape[1:])
        qtypes = {v.qtype for v in vs}
        qtype = vs[0].qtype if len(qtypes) == 1 and _keeps_qtype(shape) else None
        dtype = vs[0].dtype
        for v in vs:
            dtype = torch.promote_types(dtype, v.dtype)
        if qtype is None and any(v.qtype is not None for v in vs):
            dtype = torch.float32  # parts of different types are joined decoded (exact values)

        def load() -> torch.Tensor:
            return cat_rows([v.load() for v in vs])

        return SourceTensor(vs[0].name, shape, dtype, load, qtype, sum(v.nbytes for v in vs))

    def swap_halves(self, v: SourceTensor) -> SourceTensor:
        return dataclasses.replace(v, load=lambda: swap_halves(v.load()), tie=None)

    def permute_rows(self, v: SourceTensor, order: Callable[[], Sequence[int]]) -> SourceTensor:
        p = list(order())  # now, so that a missing head count is reported before writing
        out = dataclasses.replace(v, load=lambda: permute_rows(v.load(), p), tie=None)
        if v.qtype is not None and not _keeps_qtype(tuple(v.shape)):
            out = dataclasses.replace(out, qtype=None, dtype=torch.float32)  # rows decoded
        return out


def _decoded(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata with the scalars and strings a GGUF source copies encoded (:class:`RawValue`)
    decoded, for rules that read them (head counts); other values as they are."""
    out: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if isinstance(value, RawValue):
            fmt = _SCALAR_FMT.get(value.type)
            if fmt is not None and len(value.payload) == struct.calcsize(fmt):
                value = struct.unpack(fmt, value.payload)[0]
            elif value.type == GGUFValueType.STRING and len(value.payload) >= 8:
                value = value.payload[8:].decode("utf-8", "replace")
        out[key] = value
    return out


def relayout(tensors: list[SourceTensor], layout: str, architecture: str | None,
             path: str, context: Mapping[str, Any] | None = None
             ) -> tuple[list[SourceTensor], Detection, list[str], dict[str, Any]]:
    """``tensors`` renamed into ``layout`` of their family.

    ``context``: the source's metadata, which row orders read (llama.cpp's q/k rows: the heads).

    Returns:
        the renamed tensors, the source's detection, notes for the summary, and the metadata a
        file in that layout carries for other readers (``Family.layout_metadata``: llama.cpp's
        hyperparameters for a text encoder in its names).

    Raises:
        ModelLoadError: an unknown layout name, or a source that is no known family.
    """
    det = detect([t.name for t in tensors], architecture)
    if det is None:
        raise ModelLoadError(f"cannot write the {layout} layout: the source's tensor names match "
                             f"no known model family (known: {known_families()})", path=path)
    fam = det.family
    if layout not in fam.layouts:
        raise ModelLoadError(f"unknown layout {layout!r}: {fam.title} has the layouts "
                             f"{', '.join(fam.layouts)}", path=path)
    values, rest = det.split({t.name: t for t in tensors})
    if fam.release_layout is not None and layout == "original":
        # "original" of a family whose releases differ in naming: that of this model's release
        shapes = fam.convert({k: tuple(v.shape) for k, v in values.items()}, det.layout,
                             CANONICAL, ShapeOps(), _decoded(context))
        layout = fam.resolve_layout(layout, fam.infer_config(Shapes(shapes, path)))
    others = list(rest.values())
    extra: dict[str, Any] = {}
    if layout in fam.layout_metadata:
        shapes = fam.convert({k: tuple(v.shape) for k, v in values.items()}, det.layout,
                             CANONICAL, ShapeOps(), _decoded(context))
        extra = fam.layout_metadata[layout](fam.infer_config(Shapes(shapes, path)))
    converted = fam.convert(values, det.layout, layout, SourceOps(), _decoded(context))
    prefix = fam.original_prefix if layout != CANONICAL else ""
    out = [dataclasses.replace(t, name=prefix + name) for name, t in converted.items()]
    out += others
    notes = []
    if det.layout != layout:
        notes.append(f"{fam.title}: tensor names written in the {layout} layout (source: "
                     f"{det.layout})")
    if others:
        notes.append(f"{len(others)} tensor(s) outside the prefix {det.prefix!r} kept as they are"
                     f" (e.g. {_safe(others[0].name)})")
    return out, det, notes, extra


def source_config(path: str) -> dict[str, Any] | None:
    """The diffusers ``config.json`` beside a source (a model folder, or the folder of a file),
    when it is one (has ``_class_name``); ``None`` otherwise."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg = os.path.join(folder, "config.json")
    try:
        with open(cfg, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and "_class_name" in value else None
