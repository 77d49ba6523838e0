"""GGUF serialization: metadata values, tensor infos and the byte stream of a GGUF v3 file.

Why not gguf-py's ``GGUFWriter``: it keeps every tensor in memory until the end (or needs its
calls in a fixed order), and its ``raw_shape`` means bytes for quantized data. Here the whole header
is computed first from the entries' names, types and stored shapes, then each entry's bytes are
produced and written one at a time (:func:`write_gguf`). The file is published atomically by
:mod:`ggufvideo.publish`; deciding what to write (types, policies) is :mod:`ggufvideo.writer`'s.

What is written (GGUF v3, little-endian, 32-byte alignment)::

    "GGUF" | u32 3 | u64 n_tensors | u64 n_kv | kv pairs | tensor infos | pad | data (each aligned)

Tensors with at most 4 dims whose rows fit their type's blocks are stored as they are. Others
(Conv3d weights, or quantized tensors restored from a flattened file) are stored flattened to
``(n / w, w)`` (``w`` = 256 where it divides, else the block size) with their PyTorch shape in both
``comfy.gguf.orig_shape.<name>`` (INT32 array: what ComfyUI-GGUF's loader requires) and
``<name>.raw_shape`` (the FlashVSR convention); ggml's C loader, gguf-py, ComfyUI-GGUF and our
loader all read the result. Flattening never moves an element: blocks follow the row-major order of
the original tensor either way.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from .errors import GGUFError, QuantizationError
from .publish import atomic_file
from .quants import get_quant_type
from .shapes import COMFY_ORIG_SHAPE_PREFIX, RAW_SHAPE_SUFFIX

__all__ = [
    "ALIGNMENT",
    "GGUF_VERSION",
    "MAX_GGML_NAME",
    "RawValue",
    "TensorEntry",
    "TypedValue",
    "encode_metadata",
    "stored_layout",
    "write_gguf",
]

GGUF_VERSION = 3
ALIGNMENT = 32
#: ggml's C loader rejects tensor names of this many bytes or more (GGML_MAX_NAME).
MAX_GGML_NAME = 64

# -- metadata values ------------------------------------------------------------------------


@dataclass(frozen=True)
class TypedValue:
    """A metadata value with an explicit GGUF type (``item_type`` for arrays)."""

    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None


@dataclass(frozen=True)
class RawValue:
    """A metadata value as its encoded bytes (copied verbatim from another GGUF file)."""

    type: GGUFValueType
    payload: bytes


_SCALAR_FMT: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_TO_GGUF: dict[str, GGUFValueType] = {
    "uint8": GGUFValueType.UINT8, "int8": GGUFValueType.INT8, "uint16": GGUFValueType.UINT16,
    "int16": GGUFValueType.INT16, "uint32": GGUFValueType.UINT32, "int32": GGUFValueType.INT32,
    "float32": GGUFValueType.FLOAT32, "bool": GGUFValueType.BOOL, "uint64": GGUFValueType.UINT64,
    "int64": GGUFValueType.INT64, "float64": GGUFValueType.FLOAT64,
}


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _int_type(values: Iterable[int]) -> GGUFValueType:
    vals = list(values)
    if all(-(1 << 31) <= v < (1 << 31) for v in vals):
        return GGUFValueType.INT32
    if all(-(1 << 63) <= v < (1 << 63) for v in vals):
        return GGUFValueType.INT64
    if all(0 <= v < (1 << 64) for v in vals):
        return GGUFValueType.UINT64
    raise OverflowError("integer metadata value does not fit 64 bits")


def _infer(value: Any) -> tuple[GGUFValueType, Any, GGUFValueType | None]:
    """(type, value, item type) for a Python/numpy value, after gguf-py's conventions."""
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL, bool(value), None
    if isinstance(value, np.generic):
        return _NUMPY_TO_GGUF[value.dtype.name], value.item(), None
    if isinstance(value, int):
        return _int_type([value]), value, None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, value, None
    if isinstance(value, str):
        return GGUFValueType.STRING, value, None
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.name not in _NUMPY_TO_GGUF:
            raise TypeError(f"metadata arrays must be 1-D numeric, got {value.dtype} {value.shape}")
        return GGUFValueType.ARRAY, value, _NUMPY_TO_GGUF[value.dtype.name]
    if isinstance(value, (list, tuple)):
        items = list(value)
        if all(isinstance(v, str) for v in items) and items:
            return GGUFValueType.ARRAY, items, GGUFValueType.STRING
        if items and all(isinstance(v, (bool, np.bool_)) for v in items):
            return GGUFValueType.ARRAY, items, GGUFValueType.BOOL
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            return GGUFValueType.ARRAY, [int(v) for v in items], _int_type(int(v) for v in items)
        if all(isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) for v in items):
            return GGUFValueType.ARRAY, [float(v) for v in items], GGUFValueType.FLOAT32
        if all(isinstance(v, (list, tuple, np.ndarray)) for v in items):
            return GGUFValueType.ARRAY, items, GGUFValueType.ARRAY
        raise TypeError("metadata lists must hold values of one kind (str, bool, int, float, list)")
    raise TypeError(f"cannot store a {type(value).__name__} as GGUF metadata")


def _encode_scalar(vtype: GGUFValueType, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"STRING metadata needs a str, got {type(value).__name__}")
        return _string(value)
    return struct.pack(_SCALAR_FMT[vtype], value)


def _encode(vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None) -> bytes:
    """The bytes of a value (after its u32 type tag)."""
    if vtype != GGUFValueType.ARRAY:
        return _encode_scalar(vtype, value)
    if item_type is None:
        raise TypeError("an ARRAY value needs an item type")
    items = list(value)
    head = struct.pack("<IQ", int(item_type), len(items))
    if item_type == GGUFValueType.ARRAY:
        parts = []
        for v in items:
            t, v2, it = _infer(v)
            parts.append(_encode(t, v2, it))
        return head + b"".join(parts)
    if item_type == GGUFValueType.STRING:
        return head + b"".join(_encode_scalar(item_type, v) for v in items)
    fmt = _SCALAR_FMT[item_type]
    arr = np.asarray(items, dtype=np.dtype(fmt))
    return head + arr.tobytes()


def encode_metadata(key: str, value: Any) -> bytes:
    """One key/value pair as GGUF bytes (key string, u32 type, value)."""
    if not isinstance(key, str) or not key:
        raise GGUFError(f"metadata keys must be non-empty strings, got {key!r}")
    if isinstance(value, RawValue):
        return _string(key) + struct.pack("<I", int(value.type)) + value.payload
    if isinstance(value, TypedValue):
        vtype, v, item = value.type, value.value, value.item_type
    else:
        try:
            vtype, v, item = _infer(value)
        except (TypeError, OverflowError) as exc:
            raise GGUFError(f"metadata {key!r}: {exc}") from None
    try:
        body = _encode(vtype, v, item)
    except (TypeError, OverflowError, struct.error) as exc:
        raise GGUFError(f"metadata {key!r}: cannot encode {v!r} as {vtype.name}: {exc}") from None
    return _string(key) + struct.pack("<I", int(vtype)) + body


# -- tensors ---------------------------------------------------------------------------------


def stored_layout(shape: tuple[int, ...] | torch.Size, qtype: GGMLQuantizationType
                  ) -> tuple[tuple[int, ...], bool]:
    """The shape a tensor is stored with, and whether its real shape must go in the metadata.

    Up to 4 dims with whole-block rows: stored as is. Unquantized (F32/F16/BF16/int) tensors of
    more dims are stored as they are too, as native n-dim tensor infos: what diffusers'
    single-file GGUF loader, ComfyUI-GGUF and stable-diffusion.cpp read, and how published Wan
    files store their 5-D ``patch_embedding`` (only ggml's C loader refuses them, and it cannot
    run a video model anyway). Quantized tensors of more dims, or with rows that are not whole
    blocks (possible only for data already quantized elsewhere), are flattened to ``(n/w, w)``
    and their shape goes in the metadata: a block must not straddle two rows of ggml's 4-D view.
    A 0-d tensor is stored as ``(1,)``, an empty one as ``(0,)``.
    """
    shape = tuple(int(d) for d in shape)
    if not shape:
        return (1,), False
    if 0 in shape:
        # ggml's C loader divides by every dim but the innermost while checking sizes (and dies
        # of SIGFPE on a zero): an empty tensor is stored 1-D, its shape in the metadata.
        return (0,), len(shape) != 1
    bs = get_quant_type(qtype).block_size
    if (len(shape) <= 4 or bs == 1) and shape[-1] % bs == 0:
        return shape, False
    n = math.prod(shape)
    if n % bs:
        raise QuantizationError(
            f"{qtype.name}: {n} elements (shape {list(shape)}) are not a whole number of "
            f"{bs}-element blocks")
    if n % 256 == 0 and 256 % bs == 0:
        w = 256
    elif bs > 1:
        w = bs
    else:
        w = shape[-1] if shape[-1] else 1
    return (n // w, w), True


def _shape_metadata(name: str, shape: tuple[int, ...]) -> dict[str, TypedValue]:
    # ComfyUI-GGUF insists on ARRAY of INT32 for its key; dims of real tensors fit easily.
    dims = np.asarray(shape, dtype=np.int64)
    if dims.size and dims.max() >= (1 << 31):
        raise QuantizationError(f"dimension of {list(shape)} too large for INT32 shape metadata",
                                tensor=name)
    value = TypedValue(GGUFValueType.ARRAY, dims.astype(np.int32), GGUFValueType.INT32)
    return {COMFY_ORIG_SHAPE_PREFIX + name: value, name + RAW_SHAPE_SUFFIX: value}


@dataclass
class TensorEntry:
    """One tensor to write: its stored form and a producer of its bytes.

    Attributes:
        name: tensor name (kept verbatim).
        qtype: ggml type it is stored as.
        shape: stored shape, PyTorch order (rows last).
        produce: called once, when the tensor's turn comes; yields uint8 CPU tensors (or bytes)
            whose concatenation is exactly the tensor's data.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[torch.Tensor | bytes]]

    @property
    def nbytes(self) -> int:
        return get_quant_type(self.qtype).nbytes(self.shape)


def _pad(n: int, alignment: int) -> int:
    return (-n) % alignment


def _tensor_info(entry: TensorEntry, offset: int) -> bytes:
    dims = tuple(reversed(entry.shape))  # ggml order: innermost first
    return (_string(entry.name) + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", int(entry.qtype), offset))


def _chunk_bytes(chunk: torch.Tensor | bytes) -> memoryview:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return memoryview(chunk)
    t = chunk.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype != torch.uint8:
        t = t.view(torch.uint8)
    return memoryview(t.numpy())  # type: ignore[arg-type]  # ndarray is a buffer


def same_file(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether ``a`` and ``b`` name one existing file (links and relative paths resolved);
    false when either is missing or ``None``."""
    if a is None or b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_gguf(path: str | os.PathLike[str], entries: Iterable[TensorEntry],
               metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False,
               protect: Iterable[str | os.PathLike[str]] = ()) -> int:
    """Write a GGUF v3 file, streaming tensor data one entry at a time.

    Args:
        path: destination. Written to a temporary file in the same folder, renamed at the end.
        entries: the tensors in file order; each entry's ``produce`` runs once, in order.
        metadata: key -> value (Python/numpy values are typed like gguf-py does; use
            :class:`TypedValue` or :class:`RawValue` to control the type).
        overwrite: replace an existing ``path``; otherwise :class:`FileExistsError`.
        protect: files that must never be replaced (the conversion's sources).

    Returns:
        The size of the written file in bytes.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        GGUFError: duplicate names, bad metadata, or a producer yielding the wrong byte count.
        OSError: writing failed (disk full, file size limit, I/O error); the error names ``path``
            and nothing is left there (an existing file is untouched).
    """
    path = os.fspath(path)
    entries = list(entries)
    for src in protect:
        if same_file(path, src):
            raise GGUFError(f"refusing to write over the source file {os.fspath(src)!r}", path=path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --force to replace it)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")

    names: set[str] = set()
    for e in entries:
        if e.name in names:
            raise GGUFError("duplicate tensor name", path=path, tensor=e.name)
        names.add(e.name)
    kv = b"".join(encode_metadata(k, v) for k, v in (metadata or {}).items())
    n_kv = len(metadata or {})

    infos, offset = [], 0
    for e in entries:
        infos.append(_tensor_info(e, offset))
        offset += e.nbytes + _pad(e.nbytes, ALIGNMENT)
    header = (b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, len(entries), n_kv) + kv
              + b"".join(infos))
    header += b"\0" * _pad(len(header), ALIGNMENT)

    with atomic_file(path, overwrite) as write:
        write(memoryview(header))
        size = len(header)
        for e in entries:
            written = 0
            for chunk in e.produce():
                mv = _chunk_bytes(chunk)
                write(mv)
                written += mv.nbytes
            if written != e.nbytes:
                raise GGUFError(f"{e.qtype.name} {list(e.shape)} needs {e.nbytes} bytes, "
                                f"its producer gave {written}", path=path, tensor=e.name)
            write(memoryview(b"\0" * _pad(e.nbytes, ALIGNMENT)))
            size += written + _pad(e.nbytes, ALIGNMENT)
    return size
