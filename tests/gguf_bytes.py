"""Build GGUF files byte by byte, so tests can write exactly the broken header they need."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from gguf import GGMLQuantizationType, GGUFValueType

_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class Marks:
    """Positions recorded while building: structural boundaries and numeric header fields."""

    def __init__(self) -> None:
        self.boundaries: list[int] = []
        self.fields: list[tuple[int, int, str]] = []  # (offset, width, kind)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: GGUFValueType, v: Any, item: GGUFValueType | None = None) -> bytes:
    """Encode a metadata value (without its type tag)."""
    if vtype == GGUFValueType.STRING:
        return gstr(v)
    if vtype == GGUFValueType.ARRAY:
        assert item is not None
        out = struct.pack("<IQ", item, len(v))
        for x in v:
            if item == GGUFValueType.ARRAY:
                sub_item, sub = x
                out += value(GGUFValueType.ARRAY, sub, sub_item)
            else:
                out += value(item, x)
        return out
    return struct.pack(_FMT[vtype], v)


@dataclass
class Tensor:
    name: str
    qtype: int
    shape: tuple[int, ...]  # torch order
    data: bytes
    offset: int | None = None  # relative; None = next aligned


@dataclass
class GGUFBuilder:
    version: int = 3
    alignment: int = 32
    kv: list[tuple[str, GGUFValueType, Any, GGUFValueType | None]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"

    def add(self, key: str, vtype: GGUFValueType, v: Any, item: GGUFValueType | None = None
            ) -> GGUFBuilder:
        self.kv.append((key, vtype, v, item))
        return self

    def tensor(self, name: str, qtype: GGMLQuantizationType | int, shape: tuple[int, ...],
               data: bytes, offset: int | None = None) -> GGUFBuilder:
        self.tensors.append(Tensor(name, int(qtype), shape, data, offset))
        return self

    def build(self, marks: Marks | None = None) -> bytes:
        m = marks if marks is not None else Marks()
        out = bytearray(self.magic + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv)))
        m.boundaries += [4, 8, 16, 24]
        m.fields += [(4, 4, "version"), (8, 8, "n_tensors"), (16, 8, "n_kv")]
        for key, vtype, v, item in self.kv:
            m.fields.append((len(out), 8, "key_len"))
            out += gstr(key)
            m.boundaries.append(len(out))
            m.fields.append((len(out), 4, "value_type"))
            out += struct.pack("<I", vtype)
            m.boundaries.append(len(out))
            if vtype == GGUFValueType.ARRAY:
                m.fields += [(len(out), 4, "item_type"), (len(out) + 4, 8, "array_len")]
            elif vtype == GGUFValueType.STRING:
                m.fields.append((len(out), 8, "str_len"))
            out += value(vtype, v, item)
            m.boundaries.append(len(out))
        offsets = []
        pos = 0
        for t in self.tensors:
            off = t.offset if t.offset is not None else pos
            offsets.append(off)
            end = off + len(t.data)
            pos = end + (-end) % self.alignment
        for t, off in zip(self.tensors, offsets):
            dims = tuple(reversed(t.shape))
            m.fields.append((len(out), 8, "name_len"))
            out += gstr(t.name)
            m.boundaries.append(len(out))
            m.fields.append((len(out), 4, "n_dims"))
            m.fields += [(len(out) + 4 + 8 * i, 8, "dim") for i in range(len(dims))]
            out += struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
            m.boundaries.append(len(out))
            m.fields += [(len(out), 4, "tensor_type"), (len(out) + 4, 8, "tensor_offset")]
            out += struct.pack("<IQ", t.qtype, off)
            m.boundaries.append(len(out))
        out += b"\0" * ((-len(out)) % self.alignment)
        base = len(out)
        m.boundaries.append(base)
        for t, off in zip(self.tensors, offsets):
            need = base + off + len(t.data)
            if len(out) < need:
                out += b"\0" * (need - len(out))
            out[base + off:base + off + len(t.data)] = t.data
            m.boundaries += [base + off, base + off + len(t.data)]
        return bytes(out)

    def write(self, path: Any) -> Any:
        with open(path, "wb") as f:
            f.write(self.build())
        return path
