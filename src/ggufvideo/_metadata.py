"""GGUF metadata values: where each one lives in the file (:class:`MetadataField`), and decoding
them from the file's mapping on first access (the mapping :class:`~ggufvideo.reader.GGUFFile`
reads; the header walk that finds the values and checks their bounds is there).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType

__all__ = ["MetadataField"]

# struct format and byte width of each scalar metadata type.
_SCALAR: dict[GGUFValueType, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class MetadataField:
    """Where a metadata value lives in the file, decoded only on demand.

    ``type`` is the value type; for arrays ``item_type`` is the element type and ``count`` the
    number of elements (nested arrays: ``item_type`` is ARRAY).
    """

    key: str
    type: GGUFValueType
    offset: int  # of the value (after the u32 type tag)
    nbytes: int  # of the value
    item_type: GGUFValueType | None = None
    count: int = 1


def _decode(mm: mmap.mmap, f: MetadataField) -> Any:
    """A metadata value, read from the mapping at the field's position."""
    if f.type == GGUFValueType.ARRAY:
        return _decode_array(mm, f.offset)[0]
    return _decode_scalar(mm, f.type, f.offset)[0]


def _decode_scalar(mm: mmap.mmap, vtype: GGUFValueType, pos: int) -> tuple[Any, int]:
    if vtype == GGUFValueType.STRING:
        n = struct.unpack_from("<Q", mm, pos)[0]
        raw = bytes(mm[pos + 8:pos + 8 + n])
        return raw.decode("utf-8", errors="backslashreplace"), pos + 8 + n
    fmt, width = _SCALAR[vtype]
    return struct.unpack_from(fmt, mm, pos)[0], pos + width


def _decode_array(mm: mmap.mmap, pos: int) -> tuple[Any, int]:
    item = GGUFValueType(struct.unpack_from("<I", mm, pos)[0])
    count = struct.unpack_from("<Q", mm, pos + 4)[0]
    pos += 12
    if item in _NUMPY:
        width = _SCALAR[item][1]
        arr = np.frombuffer(mm, dtype=_NUMPY[item], count=count, offset=pos).copy()
        if item == GGUFValueType.BOOL:
            arr = arr.astype(bool)
        arr.flags.writeable = False
        return arr, pos + count * width
    out = []
    for _ in range(count):
        if item == GGUFValueType.ARRAY:
            v, pos = _decode_array(mm, pos)
        else:
            v, pos = _decode_scalar(mm, item, pos)
        out.append(v)
    return out, pos


class _LazyMetadata(Mapping[str, Any]):
    """``key -> value`` decoding each value on first access (and caching it).

    Holds the mapping and the fields, not the file: a reference back to the file would make a
    cycle, and the file's mapping (and descriptor) would outlive the last use until a garbage
    collection, after a load to the GPU too, where nothing views the mapping any more.
    """

    def __init__(self, mm: mmap.mmap, fields: dict[str, MetadataField]) -> None:
        self._mm, self._fields = mm, fields
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = _decode(self._mm, self._fields[key])
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __repr__(self) -> str:
        return f"<GGUF metadata: {len(self)} keys>"
