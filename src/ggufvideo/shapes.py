"""Restoring tensors with more than 4 dims (GGUF/ggml cap tensors at 4).

Files in the wild store such tensors in one of three ways, all restored here:

1. native n-dim tensor info (ComfyUI-GGUF's ``fix_5d_tensors.py``): the stored shape is the shape;
2. a flattened tensor plus metadata ``"<name>.raw_shape"`` = int array, PyTorch order (FlashVSR);
3. a ``(n/256, 256)`` tensor plus ``"comfy.gguf.orig_shape.<name>"`` = int array, PyTorch order
   (ComfyUI-GGUF's converter).

The stored blocks are never moved: a restored quantized tensor keeps its stored row layout and is
reshaped after decoding (a 5-D conv's rows need not line up with 256-element blocks).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .errors import ShapeMetadataError
from .reader import GGUFFile, TensorInfo

__all__ = ["COMFY_ORIG_SHAPE_PREFIX", "RAW_SHAPE_SUFFIX", "logical_shape", "shape_metadata_keys"]

COMFY_ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
RAW_SHAPE_SUFFIX = ".raw_shape"


def shape_metadata_keys(name: str) -> tuple[str, str]:
    """The two metadata keys that may carry ``name``'s original shape."""
    return COMFY_ORIG_SHAPE_PREFIX + name, name + RAW_SHAPE_SUFFIX


def _as_shape(value: Any, file: GGUFFile, info: TensorInfo, key: str) -> tuple[int, ...]:
    f = file.fields[key]
    ok = isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"
    if not ok:
        kind = f.type.name if f.item_type is None else f"{f.type.name} of {f.item_type.name}"
        raise ShapeMetadataError(f"metadata {key!r} must be an array of integers, found {kind}",
                                 path=file.path, tensor=info.name)
    dims = [int(v) for v in value]
    if not dims or any(d < 0 for d in dims):
        raise ShapeMetadataError(f"metadata {key!r} is not a valid shape: {dims}", path=file.path,
                                 tensor=info.name)
    if math.prod(dims) != info.n_elements:
        raise ShapeMetadataError(
            f"metadata {key!r} gives shape {dims} ({math.prod(dims)} elements), but the stored "
            f"{info.qtype.name} data {list(info.shape)} holds {info.n_elements} elements",
            path=file.path, tensor=info.name)
    return tuple(dims)


def logical_shape(file: GGUFFile, info: TensorInfo) -> torch.Size:
    """The shape ``info`` had before it was written, by whichever convention the file used."""
    found = [(k, _as_shape(file.metadata[k], file, info, k))
             for k in shape_metadata_keys(info.name) if k in file.fields]
    if not found:
        return torch.Size(info.shape)
    if len(found) == 2 and found[0][1] != found[1][1]:
        raise ShapeMetadataError(
            f"conflicting shape metadata: {found[0][0]!r} = {list(found[0][1])} but "
            f"{found[1][0]!r} = {list(found[1][1])}", path=file.path, tensor=info.name)
    return torch.Size(found[0][1])
