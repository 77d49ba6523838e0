"""Weights stored scaled (fp8/int8 values and a scale beside them): the scale multiplied back in.

Besides bf16 releases, users download "fp8 scaled" checkpoints (Comfy-Org's repackaged Wan 2.x
files, Kijai's WanVideo fp8_scaled ones), ComfyUI's quantized checkpoints and FP8 exports of
ModelOpt, compressed-tensors or transformers. A weight there holds low-precision values whose true
value is ``value * scale``; the scale is a tensor of its own, named after the layer:

* ``<layer>.scale_weight`` -- ComfyUI's first format, marked by a ``scaled_fp8`` tensor at the
  top of the model's names (under its prefix in an all-in-one file; ``<layer>.scale_input`` is
  an activation scale). In a marked file ComfyUI multiplies the scale into the weight whatever
  the weight's dtype, and so do we; unmarked, only into a weight stored as fp8/int8.
* ``<layer>.weight_scale`` -- ComfyUI's quantized checkpoints (a ``<layer>.comfy_quant`` tensor
  holds the layer's format as JSON bytes, and/or the header's ``_quantization_metadata`` lists
  every layer's), ModelOpt and compressed-tensors (``<layer>.input_scale`` for activations).
* ``<layer>.weight_scale_inv`` -- transformers' fine-grained FP8 (one scale per 128x128 block,
  multiplied despite its name).

The last two count only on a weight stored in a quantized dtype (fp8, int8): on a float weight the
name may be a model's own parameter. A scale is one number, one per output row (``(N,)``,
``(N, 1, ...)``), or a grid ``(a, b)`` over the weight seen as ``(N, K)`` (rows x the rest), each
entry covering ``ceil(N/a)`` rows and ``ceil(K/b)`` columns -- per-tensor and per-row scales are
that grid with one column.

Converting such a file as plain tensors writes the stored values (for fp8, up to 448 where the
true weights are ~0.01-1) and a scale nothing reads: a GGUF that loads and makes noise. Here each
scaled weight becomes a float32 tensor (value x scale, rounded once) before the policy types it;
scales, activation scales, markers and format records are dropped, and what is not understood (FP4
packed in bytes with two-level scales, a format the metadata names that is not fp8/int8, a scale
that fits no grid, a zero point) is refused by name instead of written wrong.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ..errors import GGUFError, _safe
from ..writer import SourceTensor

__all__ = ["fold_scales", "SCALE_SUFFIXES"]

#: Companion tensor suffixes holding a weight's scale (legacy ComfyUI; ComfyUI/ModelOpt/
#: compressed-tensors; transformers' fine-grained FP8).
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_inv")
_ACTIVATION_SCALES = (".scale_input", ".input_scale")
_FORMAT_SUFFIX = ".comfy_quant"
_MARKER = "scaled_fp8"
_METADATA_KEY = "_quantization_metadata"
# Layer formats whose values are plain fp8/int8 numbers times a scale (anything else -- FP4, MX
# formats with exponent-only scales -- would need a decoder of its own).
# (matched as prefixes: "float8_e4m3fn_rowwise", "int8_blockwise" are the same arithmetic)
_KNOWN_FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8", "fp8")
_STORAGE_DTYPES = tuple(d for d in (getattr(torch, n, None) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")) if d is not None) \
    + (torch.int8,)


def _grid(scale_shape: tuple[int, ...], shape: tuple[int, ...], name: str, path: str,
          block: int | None = None) -> tuple[int, int, int, int]:
    """``(a, b, rows per block, columns per block)`` of a scale over weight ``shape``.

    Blocks are ``block`` (a declared group size) where that gives the grid, else 128 -- the size
    the block-scaled formats use, the last block cut short when the weight is not a multiple --
    else whatever divides the weight exactly (per-row and per-group scales); no fit is refused.
    """
    n = shape[0] if shape else 1
    k = math.prod(shape[1:]) if len(shape) > 1 else 1
    if math.prod(scale_shape) == 1:
        return 1, 1, n, k
    dims = list(scale_shape)
    if len(dims) == 1 and dims[0] == n or len(dims) > 2 and all(d == 1 for d in dims[1:]):
        dims = [dims[0], 1]  # per row: (N,), (N, 1, ...)
    if len(dims) == 2 and n and k and dims[0] >= 1 and dims[1] >= 1:
        a, b = dims
        bn, bk = _block(n, a, block), _block(k, b, block)
        if bn and bk:
            return a, b, bn, bk
    raise GGUFError(f"scale of shape {list(scale_shape)} fits no per-tensor, per-row or block "
                    f"layout of the weight {list(shape)}", path=path, tensor=name)


def _block(size: int, count: int, declared: int | None) -> int | None:
    """The block length that cuts ``size`` into ``count`` blocks (see :func:`_grid`), or None."""
    for length in (declared, 128, size // count if size % count == 0 else None):
        if length and -(-size // length) == count:
            return length
    return None


def _apply(values: torch.Tensor, scale: torch.Tensor, grid: tuple[int, int, int, int]
           ) -> torch.Tensor:
    """``values * scale`` in float32, the scale broadcast over its blocks (one rounding)."""
    a, b, bn, bk = grid
    shape = values.shape
    if values.numel() == 0:
        return values.to(torch.float32)
    w = values.to(torch.float32).reshape(shape[0] if shape else 1, -1)
    s = scale.to(torch.float32).reshape(a, b)
    n, k = w.shape
    if n == a * bn and k == b * bk:  # whole blocks: a broadcast view, no expanded copy
        w.view(a, bn, b, bk).mul_(s.view(a, 1, b, 1))
    else:
        w.mul_(s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k])
    return w.reshape(shape)


def _declared(conf: Any) -> tuple[str, int | None]:
    """(format, group size) of one layer's record: ``{"format": ..., "group_size": ...}``."""
    if not isinstance(conf, dict):
        return str(conf), None
    group = conf.get("group_size")
    return str(conf["format"]), int(group) if group is not None else None


def _layer_formats(tensors: dict[str, SourceTensor], metadata: dict[str, Any], prefix: str,
                   path: str) -> dict[str, tuple[str, int | None]]:
    """Each layer's declared (format, group size): the header's record, ``<layer>.comfy_quant``."""
    out: dict[str, tuple[str, int | None]] = {}
    raw = metadata.get(prefix + _METADATA_KEY)
    if raw is not None:
        try:
            record = json.loads(raw)
            record = record.get(_METADATA_KEY, record)
            layers = record["layers"]
            if not isinstance(layers, dict):
                raise TypeError("layers is not an object")
            for layer, conf in layers.items():
                out[str(layer)] = _declared(conf)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GGUFError(f"header metadata {_METADATA_KEY} is not a quantization record "
                            f"({exc})", path=path) from None
    for name, t in tensors.items():
        if not name.endswith(_FORMAT_SUFFIX):
            continue
        try:
            conf = json.loads(bytes(t.load().reshape(-1).to(torch.uint8).tolist()).decode())
            out[name[: -len(_FORMAT_SUFFIX)]] = _declared(conf)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise GGUFError(f"not a layer format record (JSON with a 'format'): {exc}",
                            path=path, tensor=name) from None
    return out


def _folded(weight: SourceTensor, scale: SourceTensor, declared: tuple[str, int | None] | None,
            path: str) -> SourceTensor:
    fmt, block = declared or (None, None)
    grid = _grid(scale.shape, weight.shape, scale.name, path, block)
    # ComfyUI may keep fp8 values in a uint8 container; the declared format says which fp8.
    bits = getattr(torch, fmt.lower(), None) if fmt and weight.dtype == torch.uint8 else None
    if weight.dtype == torch.uint8 and not (isinstance(bits, torch.dtype)
                                            and bits.is_floating_point and bits.itemsize == 1):
        raise GGUFError("weight packed in bytes with a scale (FP4 such as NVFP4/MXFP4, or an "
                        "undeclared fp8 container): not supported, convert from the bf16 or fp8 "
                        "release instead", path=path, tensor=weight.name)

    def load() -> torch.Tensor:
        values = weight.load()
        return _apply(values.view(bits) if bits is not None else values, scale.load(), grid)

    def release() -> None:
        for t in (weight, scale):
            if t.release is not None:
                t.release()

    return SourceTensor(weight.name, weight.shape, torch.float32, load, None,
                        weight.nbytes + scale.nbytes, None, release)


def fold_scales(tensors: list[SourceTensor], metadata: dict[str, Any], path: str,
                metadata_prefix: str = "") -> tuple[list[SourceTensor], list[str]]:
    """The source's tensors with every scaled weight multiplied by its scale (float32), and the
    scales, activation scales, ``scaled_fp8`` marker and format records removed.

    ``metadata`` (the source's, keys under ``metadata_prefix``) loses its quantization record.
    Returns the new list (file order kept) and notes for the conversion summary.

    Raises:
        GGUFError: a scale without its weight, a scale not a float tensor, a scale that fits no
            layout of its weight, a layer format that is not fp8/int8 times a scale, an FP4 or
            other byte-packed weight, or two scales on one weight -- each naming the tensor.
    """
    by_name = {t.name: t for t in tensors}
    formats = _layer_formats(by_name, metadata, metadata_prefix, path)
    for layer, (fmt, _group) in sorted(formats.items()):
        if not fmt.lower().startswith(_KNOWN_FORMATS):
            raise GGUFError(f"layer stored as {_safe(fmt, 40)}: only fp8 and int8 weights times "
                            "a scale are read (convert from the bf16 or fp8 release instead)",
                            path=path, tensor=layer + ".weight")
    # ComfyUI's marker sits at the top of the model's own names, under any container prefix
    markers = [n for n in by_name if n == _MARKER or n.endswith("." + _MARKER)]
    drop: set[str] = set(markers)
    folded: dict[str, SourceTensor] = {}
    scale_of: dict[str, str] = {}
    for name, t in by_name.items():
        suffix = next((s for s in SCALE_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            continue
        layer = name[: -len(suffix)]
        weight = by_name.get(layer + ".weight")
        # Which scales count: ComfyUI's scale_weight in a file it marked as scaled, or beside a
        # weight stored in a quantized dtype; weight_scale(_inv) beside such a weight or on a
        # layer a format record declares. Anything else may be a parameter of the model's own.
        stored_low = weight is not None and weight.dtype in _STORAGE_DTYPES + (torch.uint8,)
        if not (stored_low or layer in formats or (suffix == ".scale_weight" and markers)):
            continue
        if weight is None:
            raise GGUFError(f"a weight scale with no {_safe(layer + '.weight')} beside it",
                            path=path, tensor=name)
        for extra, what in ((".weight_scale_2", "two-level weight scales (weight_scale_2, as "
                                                "NVFP4 writes)"),
                            (".weight_zero_point", "an asymmetric weight (a zero point)")):
            if layer + extra in by_name:
                raise GGUFError(f"{what}: not supported, convert from the bf16 or fp8 release "
                                "instead", path=path, tensor=weight.name)
        if not t.dtype.is_floating_point:
            raise GGUFError(f"scale stored as {t.dtype}, not a float (exponent-only block scales "
                            "are not supported)", path=path, tensor=name)
        if weight.name in folded:
            raise GGUFError(f"two scales for one weight ({_safe(scale_of[weight.name])} and "
                            f"{_safe(name)})", path=path, tensor=weight.name)
        folded[weight.name] = _folded(weight, t, formats.get(layer), path)
        scale_of[weight.name] = name
        drop.add(name)
        for act in _ACTIVATION_SCALES:
            if layer + act in by_name:
                drop.add(layer + act)
    for layer in formats:
        if layer + ".weight" in by_name and layer + ".weight" not in folded:
            raise GGUFError(f"layer declared as {_safe(formats[layer][0], 40)} has no weight scale",
                            path=path, tensor=layer + ".weight")
        drop.add(layer + _FORMAT_SUFFIX)
    if markers:
        drop.update(n for n in by_name if n.endswith(".scale_input"))
    if not folded and not markers:
        return tensors, []
    metadata.pop(metadata_prefix + _METADATA_KEY, None)
    out = [folded.get(t.name, t) for t in tensors if t.name not in drop]
    notes = [f"{len(folded)} scaled weight(s) multiplied by their scales into float32 "
             f"(dropped {len(drop)} scale, activation-scale and format tensor(s))"]
    return out, notes
