"""Reading GGUF files: a validating, memory-mapped header parser with lazy metadata.

Why not gguf-py's ``GGUFReader``: it decodes every metadata array into numpy objects while opening
(about 9 s for a 262k-token vocabulary), and it trusts the header's counts and offsets. This parser
walks the header once with bounds checks against the file size, records where each metadata value
lives, and decodes a value only when it is asked for. Opening costs one pass over the header bytes.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)

Strings are u64 length + UTF-8 bytes; arrays are u32 element type + u64 count + elements.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from ._metadata import _SCALAR, MetadataField, _decode, _LazyMetadata
from .errors import InvalidHeaderError, TensorLayoutError, UnsupportedTypeError, _safe
from .quants import get_quant_type

__all__ = ["GGUFFile", "TensorInfo", "MetadataField", "GGUF_MAGIC", "DEFAULT_ALIGNMENT", "is_gguf"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
#: ggml caps tensors at 4 dims; native n-dim files (ComfyUI-GGUF's 5-D convs) exceed that. We read
#: up to this many dims; beyond it a header is treated as corrupt rather than sized by its value.
MAX_DIMS = 16
#: Bound on the product of a tensor's dims (int64 sizes and strides must not overflow).
MAX_ELEMENTS = 2**62
#: Nested metadata arrays deeper than this are refused (real files nest at most once); bounding the
#: depth keeps a crafted file from exhausting the interpreter's recursion limit.
MAX_ARRAY_NESTING = 16

_KNOWN_QTYPES = {int(t): t for t in GGMLQuantizationType}


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with GGUF's magic (a cheap test of which kind of file it is; the
    header is validated only by :class:`GGUFFile`)."""
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it.

    Attributes:
        name: tensor name.
        qtype: ggml type.
        shape: stored shape in PyTorch order (ggml's dims reversed); rows along the last dim.
        offset: absolute byte offset of the data in the file.
        nbytes: bytes of data.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def need(self, n: int, what: str | Callable[[], str]) -> None:
        """Raise unless ``n`` more bytes are in the file. ``what`` names the field; a callable is
        formatted only for the message (a 14B model's header has ~1,100 tensor names to quote)."""
        if n < 0 or self.pos + n > self.size:
            raise InvalidHeaderError(
                f"truncated file: {_describe(what)} needs {n} bytes at offset "
                f"{self.pos}, but the file has {self.size} bytes", path=self.path)

    def unpack(self, fmt: str, width: int, what: str | Callable[[], str]) -> Any:
        self.need(width, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += width
        return v

    def u32(self, what: str | Callable[[], str]) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str | Callable[[], str]) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str | Callable[[], str]) -> str:
        n = self.u64(lambda: f"length of {_describe(what)}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # Invalid UTF-8 is data, not a crash: keep it visible but harmless.
        return raw.decode("utf-8", errors="backslashreplace")

    def skip_string(self, what: str | Callable[[], str]) -> None:
        n = self.u64(lambda: f"length of {_describe(what)}")
        self.need(n, what)
        self.pos += n


def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def _value_type(raw: int, cur: _Cursor, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise InvalidHeaderError(f"{what}: unknown metadata value type {raw}",
                                 path=cur.path) from None


class GGUFFile:
    """An open, validated GGUF file.

    The file is mapped copy-on-write (never written: a stray write through a tensor view lands in
    private pages, not on disk). Tensor data is exposed as zero-copy uint8 views of the mapping.

    Attributes:
        path: the file.
        version: GGUF version (2 or 3).
        alignment: data alignment in bytes.
        fields: ``key -> MetadataField`` (positions only; nothing decoded).
        metadata: ``key -> value``, decoded lazily. Scalars are Python values, strings ``str``,
            numeric arrays read-only numpy arrays, string and nested arrays lists.
        tensors: ``name -> TensorInfo`` in file order.
        data_offset: absolute offset of the tensor data section.

    Raises:
        FileNotFoundError: no such file.
        InvalidHeaderError / TensorLayoutError / UnsupportedTypeError: the header is not a valid
            GGUF header for this file (each message names the file and what was wrong).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise InvalidHeaderError("not a GGUF file: the file is empty", path=self.path)
            # ACCESS_COPY: writable views for torch.frombuffer without ever touching the file.
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = size
        self.fields: dict[str, MetadataField] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: Mapping[str, Any] = _LazyMetadata(self._mm, self.fields)
        self._parse()

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the mapping, unless tensors still view it: then it stays mapped until the last
        of them is collected (closing never invalidates a tensor)."""
        try:
            self._mm.close()
        except BufferError:
            pass

    def __repr__(self) -> str:
        return (f"GGUFFile({_safe(self.path, 300)!r}, v{self.version}, "
                f"{len(self.tensors)} tensors, {len(self.fields)} metadata keys)")

    # -- parsing ----------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.path)
        if self.size < 4 or bytes(self._mm[:4]) != GGUF_MAGIC:
            found = bytes(self._mm[:4])
            raise InvalidHeaderError(f"not a GGUF file: expected magic b'GGUF', found {found!r}",
                                     path=self.path)
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
                raise InvalidHeaderError("big-endian GGUF files are not supported", path=self.path)
            raise InvalidHeaderError(
                f"unsupported GGUF version {version}: expected one of {SUPPORTED_VERSIONS}",
                path=self.path)
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Bound counts by what the file could hold before any loop or allocation uses them:
        # a metadata entry is at least 8+1+4+1 bytes, a tensor info at least 8+1+4+4+8.
        if n_kv > (self.size - cur.pos) // 14:
            raise InvalidHeaderError(f"metadata count {n_kv} cannot fit in a {self.size}-byte file",
                                     path=self.path)
        if n_tensors > (self.size - cur.pos) // 25:
            raise InvalidHeaderError(
                f"tensor count {n_tensors} cannot fit in a {self.size}-byte file", path=self.path)

        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = _value_type(cur.u32(f"type of metadata {_safe(key)!r}"), cur,
                                f"metadata {_safe(key)}")
            start = cur.pos
            item_type, count = self._skip_value(cur, vtype, key)
            if key in self.fields:
                raise InvalidHeaderError(f"duplicate metadata key {_safe(key)!r}", path=self.path)
            self.fields[key] = MetadataField(key, vtype, start, cur.pos - start, item_type, count)

        self.alignment = self._read_alignment()

        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = cur.string(lambda: f"name of tensor #{i}")
            n_dims = cur.u32(lambda: f"n_dims of tensor {_safe(name)!r}")
            if n_dims > MAX_DIMS:
                raise InvalidHeaderError(f"n_dims {n_dims} exceeds the maximum {MAX_DIMS}",
                                         path=self.path, tensor=name)
            cur.need(8 * n_dims + 12, lambda: f"dims, type and offset of tensor {_safe(name)!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._mm, cur.pos)
            raw_type, offset = struct.unpack_from("<IQ", self._mm, cur.pos + 8 * n_dims)
            cur.pos += 8 * n_dims + 12
            # torch sizes and strides are int64: refuse dims whose product could overflow them
            # (zero-sized dims included) before anything is shaped by these numbers.
            nonzero = math.prod(d for d in dims if d)
            if nonzero > MAX_ELEMENTS:
                raise InvalidHeaderError(f"dims {list(reversed(dims))} are too large",
                                         path=self.path, tensor=name)
            infos.append((name, tuple(reversed(dims)), raw_type, offset))

        pad = (-cur.pos) % self.alignment
        self.data_offset = cur.pos + pad
        self._build_tensors(infos)

    def _skip_value(self, cur: _Cursor, vtype: GGUFValueType, key: str, depth: int = 0
                    ) -> tuple[GGUFValueType | None, int]:
        """Advance past one value; return (item type, count) for arrays, (None, 1) otherwise."""
        what = f"metadata {_safe(key)!r}"
        if depth > MAX_ARRAY_NESTING:
            raise InvalidHeaderError(
                f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels", path=self.path)
        if vtype == GGUFValueType.STRING:
            cur.skip_string(what)
            return None, 1
        if vtype in _SCALAR:
            cur.need(_SCALAR[vtype][1], what)
            cur.pos += _SCALAR[vtype][1]
            return None, 1
        # ARRAY
        item = _value_type(cur.u32(f"{what} element type"), cur, what)
        count = cur.u64(f"{what} element count")
        if item in _SCALAR:
            width = _SCALAR[item][1]
            if count > (cur.size - cur.pos) // width:
                raise InvalidHeaderError(
                    f"{what}: array of {count} x {width}-byte elements runs past the end of the "
                    f"{cur.size}-byte file", path=self.path)
            cur.pos += count * width
        elif item == GGUFValueType.STRING:
            if count > (cur.size - cur.pos) // 8:
                raise InvalidHeaderError(f"{what}: array of {count} strings cannot fit in the file",
                                         path=self.path)
            buf, pos, size = self._mm, cur.pos, cur.size
            unpack = struct.Struct("<Q").unpack_from
            # A tight loop: this is the one place a 262k-entry vocabulary is walked at open time.
            for _ in range(count):
                if pos + 8 > size:
                    break
                pos += 8 + unpack(buf, pos)[0]
            else:
                if pos <= size:
                    cur.pos = pos
                    return item, count
            raise InvalidHeaderError(f"truncated file: {what} string array runs past the end",
                                     path=self.path)
        else:  # nested arrays: rare and small; walk them recursively
            if count > (cur.size - cur.pos) // 12:
                raise InvalidHeaderError(f"{what}: array of {count} arrays cannot fit in the file",
                                         path=self.path)
            for _ in range(count):
                self._skip_value(cur, GGUFValueType.ARRAY, key, depth + 1)
        return item, count

    def _read_alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return DEFAULT_ALIGNMENT
        value = _decode(self._mm, f)
        if f.type not in (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32,
                          GGUFValueType.UINT64, GGUFValueType.INT32, GGUFValueType.INT64) \
                or value <= 0 or value & (value - 1):
            raise InvalidHeaderError(
                f"general.alignment must be a positive power of two integer, found {value!r} "
                f"({f.type.name})", path=self.path)
        return int(value)

    def _build_tensors(self, infos: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        spans: list[tuple[int, int, str]] = []
        for name, shape, raw_type, rel in infos:
            if name in self.tensors:
                raise TensorLayoutError("duplicate tensor name", path=self.path, tensor=name)
            qtype = _KNOWN_QTYPES.get(raw_type)
            if qtype is None:
                raise UnsupportedTypeError(f"unknown ggml type id {raw_type}", path=self.path,
                                           tensor=name)
            try:
                qt = get_quant_type(qtype)
            except UnsupportedTypeError:
                raise UnsupportedTypeError(f"ggml type {qtype.name} is not supported",
                                           path=self.path, tensor=name) from None
            row = shape[-1] if shape else 1
            if row % qt.block_size:
                raise TensorLayoutError(
                    f"row length {row} is not a multiple of the {qtype.name} block size "
                    f"{qt.block_size}", path=self.path, tensor=name)
            n = math.prod(shape)
            # Python ints do not overflow; compare against the file before anything is sized.
            nbytes = n // qt.block_size * qt.type_size()
            if rel % self.alignment:
                raise TensorLayoutError(
                    f"data offset {rel} is not a multiple of the alignment {self.alignment}",
                    path=self.path, tensor=name)
            start = self.data_offset + rel
            if start + nbytes > self.size:
                raise TensorLayoutError(
                    f"data [{start}, {start + nbytes}) ({qtype.name} {list(shape)}) lies outside "
                    f"the {self.size}-byte file", path=self.path, tensor=name)
            self.tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)
            if nbytes:
                spans.append((start, start + nbytes, name))
        spans.sort()
        for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise TensorLayoutError(
                    f"data [{s1}, ...) overlaps tensor {_safe(n0)!r} at [{s0}, {e0})",
                    path=self.path, tensor=n1)

    # -- tensor data ------------------------------------------------------------------------
    def tensor_data(self, name: str | TensorInfo) -> torch.Tensor:
        """The stored bytes of a tensor as a zero-copy uint8 view, shape
        ``(*shape[:-1], row_bytes)``."""
        info = name if isinstance(name, TensorInfo) else self.tensors[name]
        shape = info.shape or (1,)
        row_bytes = get_quant_type(info.qtype).row_bytes(shape[-1]) if shape[-1] else 0
        if info.nbytes == 0:
            return torch.empty((*shape[:-1], row_bytes), dtype=torch.uint8)
        # Through numpy, not torch.frombuffer: numpy holds a buffer export on the mapping for as
        # long as the view lives, so close() cannot unmap memory a tensor still points into.
        arr = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return torch.from_numpy(arr).view(*shape[:-1], row_bytes)
