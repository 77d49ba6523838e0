"""``inspect`` and ``validate``: what a GGUF file holds, and whether all of it is sound.

Both work from the validating reader (:class:`~ggufvideo.reader.GGUFFile`), so a malformed header
is reported, not crashed on. ``validate`` then reads every byte of tensor data: it decodes every
tensor with the library's codecs and checks every floating field of every block (the scales ``d``,
``dmin``... of quantized types; the values themselves for F32/F16/BF16) for NaN and infinity.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import GGUFError, _safe
from .quants import get_quant_type
from .reader import GGUFFile, TensorInfo
from .shapes import logical_shape
from .sources import Source, open_source
from .writer import MAX_GGML_NAME, format_bytes

__all__ = ["inspect_file", "validate_file", "format_inspection", "ValidationReport",
           "summarize_value"]

# Bytes of tensor data validated per step (bounds memory whatever the tensor size).
_CHUNK_BYTES = 1 << 24
# Arrays longer than this are summarised in reports.
_ARRAY_PREVIEW = 8
# Report lines and messages longer than this are cut (they may quote names from the file).
_MESSAGE_LIMIT = 1000
# The tensor-name column of ``inspect`` is at most this wide; longer names overflow it.
_NAME_COLUMN = 64


def _printable(text: object, limit: int = _MESSAGE_LIMIT) -> str:
    """``text`` escaped and bounded for a report line or CLI message (see ``errors._safe``)."""
    return _safe(text, limit)


def summarize_value(value: Any, limit: int = _ARRAY_PREVIEW) -> Any:
    """A JSON-friendly value, with arrays longer than ``limit`` cut to a preview and a count."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = [summarize_value(v, limit) for v in list(value)[:limit]]
        if len(value) > limit:
            return {"length": len(value), "first": items}
        return items
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"...({len(value)} chars)"
    return value


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a GGUF file: header, metadata (long arrays summarised), tensors, totals per type.

    Returns:
        A JSON-serialisable dict with keys ``path``, ``version``, ``alignment``, ``file_size``,
        ``metadata``, ``tensors`` (list of name/type/shape/stored_shape/bytes), ``totals`` (type ->
        count/bytes/elements), ``n_tensors`` and ``model`` (the detected family, title, kind,
        variant, layout, prefix, diffusers class and inferred config; or ``family: None`` and
        an ``error`` saying why none was found).

    Raises:
        FileNotFoundError, GGUFError: as :class:`~ggufvideo.reader.GGUFFile`.
    """
    with GGUFFile(path) as g:
        meta = {k: summarize_value(g.metadata[k]) for k in g.fields}
        tensors: list[dict[str, Any]] = []
        totals: dict[str, Any] = {}
        for name, info in g.tensors.items():
            entry: dict[str, Any] = {"name": name, "type": info.qtype.name}
            try:
                entry["shape"] = list(logical_shape(g, info))
            except GGUFError as exc:  # show the tensor as stored; validate reports the problem
                entry["shape"] = list(info.shape)
                entry["shape_error"] = exc.reason
            entry.update(stored_shape=list(info.shape), bytes=info.nbytes)
            tensors.append(entry)
            t = totals.setdefault(info.qtype.name, {"count": 0, "bytes": 0, "elements": 0})
            t["count"] += 1
            t["bytes"] += info.nbytes
            t["elements"] += info.n_elements
        return {"path": g.path, "version": g.version, "alignment": g.alignment,
                "file_size": g.size, "data_offset": g.data_offset, "n_tensors": len(tensors),
                "model": _model_summary(g), "metadata": meta, "tensors": tensors,
                "totals": totals}


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a checkpoint that is not GGUF -- a ``.safetensors`` file, a folder of shards, a
    ``.pt``/``.pth`` -- by its header: tensors (name, dtype, shape, bytes) as the converter reads
    them (fp8-scaled weights already multiplied back), totals per dtype, the converter's notes,
    the source's text metadata, and the detected model as for a GGUF file (``model``).

    Raises:
        FileNotFoundError, GGUFError: as :func:`ggufvideo.convert.open_source`.
    """
    src = open_source(path)  # (read once: the model is described from the same header)
    tensors: list[dict[str, Any]] = [
        {"name": t.name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
         "bytes": t.nbytes} for t in src.tensors]
    totals: dict[str, dict[str, int]] = {}
    for t in tensors:
        entry = totals.setdefault(str(t["dtype"]), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(t["bytes"])
    p = os.fspath(path)
    size = sum(os.path.getsize(f) for f in src.files if os.path.isfile(f)) or (
        os.path.getsize(p) if os.path.isfile(p) else 0)
    return {"path": p, "kind": src.kind, "file_size": size, "n_tensors": len(tensors),
            "model": _model_summary(src), "notes": list(src.notes),
            "metadata": {k: summarize_value(v) for k, v in src.metadata.items()},
            "tensors": tensors, "totals": totals}


def format_checkpoint(info: Mapping[str, Any], *, tensors: bool = True) -> str:
    """The human-readable form of :func:`inspect_checkpoint`'s result."""
    lines = [f"{_safe(info['path'], 400)}: {info['kind']} checkpoint, {info['n_tensors']} "
             f"tensors, {format_bytes(info['file_size'])}", ""]
    lines += _format_model(info.get("model"))
    lines += [_printable(f"note: {n}") for n in info["notes"]]
    if info["metadata"]:
        lines += ["", "metadata:"]
        lines += [_printable(f"  {_safe(k)} = {v!r}") for k, v in info["metadata"].items()]
    if tensors:
        lines += ["", "tensors:"]
        lines += [_printable(f"  {_safe(t['name'])}  {t['dtype']}  "
                             f"{'x'.join(map(str, t['shape'])) or '()'}  "
                             f"{format_bytes(t['bytes'])}") for t in info["tensors"]]
    lines += ["", "totals per dtype:"]
    lines += [f"  {k:<14} {v['count']} tensors  {format_bytes(v['bytes'])}"
              for k, v in info["totals"].items()]
    return "\n".join(lines)


def _model_summary(g: GGUFFile | Source) -> dict[str, Any]:
    """The detected family, variant, layout and inferred config, or why there is none."""
    from .building import describe_file

    try:
        return describe_file(g).as_dict()
    except GGUFError as exc:  # an unknown family or a config that cannot be read: say why
        return {"family": None, "error": exc.reason}


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_file`.

    Attributes:
        path: the file.
        errors: problems that make the file unsound (each names the tensor when there is one).
        warnings: things other readers may refuse (long names, more than 4 dims) but that are valid.
        tensors_checked: tensors fully decoded.
        bytes_checked: bytes of tensor data read.
    """

    path: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "tensors_checked": self.tensors_checked, "bytes_checked": self.bytes_checked}


def _check_tensor(g: GGUFFile, info: TensorInfo, report: ValidationReport) -> None:
    qt = get_quant_type(info.qtype)
    ts = qt.type_size()
    raw = g.tensor_data(info).reshape(-1)
    float_fields = [f for f in qt.layout.fields
                    if f.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    what = "value" if qt.torch_dtype is not None else "scale"
    bad: dict[str, tuple[int, int]] = {}  # field -> (count, first block)
    step = max(1, _CHUNK_BYTES // ts) * ts
    for start in range(0, raw.numel(), step):
        blocks = raw[start:start + step].reshape(-1, ts)
        first_block = start // ts
        for f in float_fields:
            vals = qt.layout.field(blocks, f.name)
            nonfinite = ~torch.isfinite(vals)
            if bool(nonfinite.any()):
                rows = nonfinite.any(dim=1).nonzero()
                count, first = bad.get(f.name, (0, first_block + int(rows[0])))
                bad[f.name] = (count + int(nonfinite.sum()), first)
        if qt.torch_dtype is None or not qt.torch_dtype.is_floating_point:
            qt.dequantize_blocks(blocks)  # raises on undecodable data
        report.bytes_checked += blocks.numel()
    for fname, (count, first) in bad.items():
        where = f"field {fname!r}, " if qt.torch_dtype is None else ""
        report.errors.append(f"tensor {_safe(info.name)} ({info.qtype.name}): {count} "
                             f"non-finite {what}(s) ({where}first in block {first})")


def validate_file(path: str | os.PathLike[str]) -> ValidationReport:
    """Check a GGUF file completely: header, offsets, shape metadata, every tensor's data.

    Never raises for a bad file (a missing one still raises ``FileNotFoundError``): every problem
    goes into the report.
    """
    p = os.fspath(path)
    report = ValidationReport(p)
    try:
        g = GGUFFile(p)
    except GGUFError as exc:
        report.errors.append(_printable(f"header: {exc.reason}" + (
            f" (tensor {_safe(exc.tensor)})" if exc.tensor else "")))
        return report
    with g:
        end = g.data_offset
        for name, info in g.tensors.items():
            shown = _safe(name)
            end = max(end, info.offset + info.nbytes)
            if len(name.encode("utf-8")) >= MAX_GGML_NAME:
                report.warnings.append(f"tensor {shown}: name of {len(name.encode())} bytes; "
                                       f"ggml's C loader accepts at most {MAX_GGML_NAME - 1}")
            if 0 in info.shape[:-1]:
                report.warnings.append(f"tensor {shown}: empty with a zero outer dim "
                                       f"{list(info.shape)}; ggml's C loader crashes on it")
            if len(info.shape) > 4:
                report.warnings.append(f"tensor {shown}: stored with {len(info.shape)} dims; "
                                       "ggml's C loader accepts at most 4")
            try:
                logical_shape(g, info)
            except GGUFError as exc:
                report.errors.append(_printable(f"tensor {shown}: {exc.reason}"))
            try:
                _check_tensor(g, info, report)
                report.tensors_checked += 1
            except Exception as exc:  # a codec failing on this data is exactly what we report
                report.errors.append(_printable(f"tensor {shown} ({info.qtype.name}): not "
                                               f"decodable: {exc}"))
        if g.size > end + g.alignment:
            report.warnings.append(f"{g.size - end} bytes after the last tensor's data")
    return report


def _format_model(model: Mapping[str, Any] | None) -> list[str]:
    if not model:
        return []
    if model.get("family") is None:
        return [_printable(f"model: not recognised ({model.get('error', 'unknown')})", 600)]
    lines = [_printable(f"model: {model['title']} ({model['family']}), {model['variant']}"),
             _printable(f"  layout: {model['layout']}"
                        + (f" (prefix {model['prefix']!r})" if model["prefix"] else "")),
             _printable(f"  class: {model['class']}"), "  config:"]
    lines += [_printable(f"    {k} = {v!r}") for k, v in model["config"].items()]
    return lines


def format_inspection(info: Mapping[str, Any], *, tensors: bool = True) -> str:
    """The human-readable form of :func:`inspect_file`'s result."""
    lines = [f"{_safe(info['path'], 400)}: GGUF v{info['version']}, {info['n_tensors']} tensors, "
             f"{format_bytes(info['file_size'])}, alignment {info['alignment']}", ""]
    lines += _format_model(info.get("model"))
    lines += ["", "metadata:"]
    for k, v in info["metadata"].items():
        if isinstance(v, dict) and "length" in v:
            v = f"[{v['length']} items: {', '.join(map(repr, v['first']))}, ...]"
            lines.append(_printable(f"  {_safe(k)} = {v}"))
        else:  # repr escapes a string's control characters
            lines.append(_printable(f"  {_safe(k)} = {v!r}" if isinstance(v, str)
                                   else f"  {_safe(k)} = {v}"))
    if tensors:
        lines += ["", "tensors:"]
        names = [_safe(t["name"]) for t in info["tensors"]]
        width = min(max(map(len, names), default=4), _NAME_COLUMN)
        for name, t in zip(names, info["tensors"]):
            shape = "x".join(map(str, t["shape"])) or "scalar"
            note = (f"  (bad shape metadata: {_printable(t['shape_error'], 300)})"
                    if "shape_error" in t else "")
            lines.append(f"  {name:<{width}}  {t['type']:<7} {shape:<22} "
                         f"{format_bytes(t['bytes'])}{note}")
    lines += ["", "totals per type:"]
    for name, t in sorted(info["totals"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {name:<7} {t['count']:>6} tensors  {format_bytes(t['bytes']):>11}  "
                     f"{t['elements']:,} elements")
    return "\n".join(lines)
