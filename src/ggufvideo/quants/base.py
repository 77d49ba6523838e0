"""The quant-type registry: one class per ggml type, its block layout declared once.

A codec is a subclass of :class:`QuantType` registered by keyword::

    class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0, block_size=32,
               layout=Layout(("d", F16, 1), ("qs", I8, 32))):
        @classmethod
        def dequantize_blocks(cls, blocks): ...
        @classmethod
        def quantize_blocks(cls, x, imatrix, *, blocks_per_row=1): ...

The layout is the single source of truth for the byte size of a block (checked against gguf-py's
table in the tests) and for where each field lives; dequantization, quantization, the Triton kernels
and size math all read it from here. Codecs work on a 2-D uint8 tensor of blocks
``(n_blocks, type_size)`` and return ``(n_blocks, block_size)`` float32, vectorized over all
blocks, on whatever device the blocks are on.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from gguf import GGMLQuantizationType

from ..errors import QuantizationError, UnsupportedTypeError

__all__ = [
    "Field",
    "delegated_quantizer",
    "Layout",
    "QuantType",
    "get_quant_type",
    "registered_types",
    "to_qtype",
    "F16",
    "BF16",
    "F32",
    "U8",
    "I8",
    "U16",
    "U32",
]

# Field element types. Kept as torch dtypes so a layout can be unpacked with a view.
F16 = torch.float16
BF16 = torch.bfloat16
F32 = torch.float32
U8 = torch.uint8
I8 = torch.int8
U16 = torch.uint16
U32 = torch.uint32


@dataclass(frozen=True)
class Field:
    """One field of a block: ``count`` elements of ``dtype`` starting at byte ``offset``."""

    name: str
    dtype: torch.dtype
    count: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


class Layout:
    """The byte layout of one block: named fields in storage order, little-endian, no padding."""

    def __init__(self, *fields: tuple[str, torch.dtype, int]) -> None:
        out: list[Field] = []
        offset = 0
        for name, dtype, count in fields:
            f = Field(name, dtype, count, offset)
            out.append(f)
            offset += f.nbytes
        self.fields: tuple[Field, ...] = tuple(out)
        self.type_size: int = offset
        self._by_name = {f.name: f for f in out}

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}:{str(f.dtype).removeprefix('torch.')}[{f.count}]@{f.offset}"
                          for f in self.fields)
        return f"Layout({inner}; {self.type_size} bytes)"

    def field(self, blocks: torch.Tensor, name: str) -> torch.Tensor:
        """Field ``name`` of every block as ``(n_blocks, count)`` of the field's dtype.

        uint8 fields are zero-copy slices; wider fields are gathered into a contiguous buffer first
        because their byte offset inside a block is not always aligned to their width (Q5_0's ``qh``
        sits at byte 2 of a 22-byte block).
        """
        f = self._by_name[name]
        raw = blocks[:, f.offset:f.offset + f.nbytes]
        if f.dtype == torch.uint8:
            return raw
        return raw.contiguous().view(f.dtype)

    def unpack(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """All fields, as :meth:`field` returns them."""
        return {f.name: self.field(blocks, f.name) for f in self.fields}

    def pack(self, **values: torch.Tensor) -> torch.Tensor:
        """Assemble blocks from per-field tensors ``(n_blocks, count)``; the inverse of unpack."""
        missing = set(self._by_name) - set(values)
        extra = set(values) - set(self._by_name)
        if missing or extra:
            raise ValueError(
                f"Layout.pack: missing fields {sorted(missing)}, unknown {sorted(extra)}")
        parts = []
        for f in self.fields:
            v = values[f.name].to(f.dtype).contiguous()
            as_bytes = v.reshape(v.shape[0], f.count).view(torch.uint8)
            parts.append(as_bytes.reshape(v.shape[0], f.nbytes))
        return torch.cat(parts, dim=1)


_REGISTRY: dict[GGMLQuantizationType, type[QuantType]] = {}


class QuantType:
    """Base of every codec. Subclasses are registered by their ``qtype`` keyword.

    Class attributes set by registration:
        qtype: the ggml type id.
        block_size: elements per block.
        layout: the block's :class:`Layout`; ``layout.type_size`` is the bytes per block.
        torch_dtype: for plain (unquantized) types, the torch dtype the bytes hold; else ``None``.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    layout: ClassVar[Layout]
    torch_dtype: ClassVar[torch.dtype | None] = None
    #: Whether :meth:`quantize_blocks` is implemented for this type.
    can_quantize: ClassVar[bool] = False

    def __init_subclass__(cls, *, qtype: GGMLQuantizationType | None = None, block_size: int = 1,
                          layout: Layout | None = None, torch_dtype: torch.dtype | None = None,
                          **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an abstract intermediate class
            return
        if layout is None:
            raise TypeError(f"{cls.__name__}: a layout is required")
        if qtype in _REGISTRY:
            raise TypeError(f"{cls.__name__}: {qtype.name} is already registered by "
                            f"{_REGISTRY[qtype].__name__}")
        cls.qtype = qtype
        cls.block_size = block_size
        cls.layout = layout
        cls.torch_dtype = torch_dtype
        cls.can_quantize = "quantize_blocks" in cls.__dict__ or any(
            "quantize_blocks" in b.__dict__ for b in cls.__mro__[1:] if b is not QuantType)
        _REGISTRY[qtype] = cls

    # -- sizes -------------------------------------------------------------------------------
    @classmethod
    def type_size(cls) -> int:
        """Bytes per block."""
        return cls.layout.type_size

    @classmethod
    def row_bytes(cls, n_elements: int) -> int:
        """Bytes needed for a row of ``n_elements`` (must be a multiple of the block size)."""
        if n_elements % cls.block_size:
            raise QuantizationError(
                f"{cls.qtype.name}: row length {n_elements} is not a multiple of the block size "
                f"{cls.block_size}")
        return n_elements // cls.block_size * cls.type_size()

    @classmethod
    def row_elements(cls, n_bytes: int) -> int:
        """Elements held by ``n_bytes`` of blocks (must be a whole number of blocks)."""
        if n_bytes % cls.type_size():
            raise QuantizationError(
                f"{cls.qtype.name}: {n_bytes} bytes is not a whole number of "
                f"{cls.type_size()}-byte blocks")
        return n_bytes // cls.type_size() * cls.block_size

    @classmethod
    def nbytes(cls, shape: tuple[int, ...] | torch.Size) -> int:
        """Bytes a tensor of logical ``shape`` takes, rows along the last dim."""
        n = math.prod(shape)
        return cls.row_bytes(shape[-1]) * (n // shape[-1]) if n else 0

    # -- codecs ------------------------------------------------------------------------------
    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """Decode ``(n_blocks, type_size)`` uint8 into ``(n_blocks, block_size)`` float32.

        Must be bit-identical to ggml's ``dequantize_row_*``: every product and sum in float32, in
        ggml's order, no fused multiply-add.
        """
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, x: torch.Tensor, imatrix: torch.Tensor | None, *,
                        blocks_per_row: int = 1) -> torch.Tensor:
        """Encode ``(n_blocks, block_size)`` float32 into ``(n_blocks, type_size)`` uint8.

        ``imatrix`` is ``None`` or the importance weights of the block's positions,
        ``(n_blocks, block_size)`` float32. ``blocks_per_row``: how many consecutive blocks make
        one row of the tensor (the default takes each block as a row). It matters only where
        ggml's weighting uses whole-row statistics -- Q4_0/Q4_1/Q5_0/Q5_1 with an importance
        matrix scale it by the row's mean square -- and is why :func:`ggufvideo.quants.quantize`
        can go through this method for every type. Must be byte-identical to
        ``ggml_quantize_chunk`` on rows of ``blocks_per_row`` blocks.
        """
        raise UnsupportedTypeError(f"quantizing to {cls.qtype.name} is not supported")


def delegated_quantizer(module: str, function: str, *, row_aware: bool = False) -> classmethod:
    """A ``quantize_blocks`` classmethod calling ``ggufvideo.quants.<module>.<function>``.

    The search code of the quantizers is long; it lives in its own modules, imported only when a
    type is first quantized, while each type's class (and layout) stays in its family module.
    ``row_aware``: the function takes ``blocks_per_row`` (its result depends on the rows); others
    compute everything per block, so the row geometry cannot change their bytes.
    """

    def quantize_blocks(cls: type[QuantType], x: torch.Tensor, imatrix: torch.Tensor | None, *,
                        blocks_per_row: int = 1) -> torch.Tensor:
        impl = importlib.import_module(f"{__package__}.{module}")
        if row_aware:
            return getattr(impl, function)(x, imatrix, blocks_per_row=blocks_per_row)
        return getattr(impl, function)(x, imatrix)

    quantize_blocks.__doc__ = QuantType.quantize_blocks.__doc__
    return classmethod(quantize_blocks)


def to_qtype(qtype: GGMLQuantizationType | str | int) -> GGMLQuantizationType:
    """Normalise a type given as enum, name (``"Q4_K"``, case-insensitive) or id."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.strip().upper()]
        except KeyError:
            raise UnsupportedTypeError(f"unknown ggml type name {qtype!r}") from None
    if isinstance(qtype, int) and not isinstance(qtype, bool):
        try:
            return GGMLQuantizationType(qtype)
        except ValueError:
            raise UnsupportedTypeError(f"unknown ggml type id {qtype}") from None
    raise TypeError(f"expected a GGMLQuantizationType, name or id, got {type(qtype).__name__}")


def get_quant_type(qtype: GGMLQuantizationType | str | int) -> type[QuantType]:
    """The codec class for ``qtype``; :class:`UnsupportedTypeError` if there is none."""
    q = to_qtype(qtype)
    try:
        return _REGISTRY[q]
    except KeyError:
        raise UnsupportedTypeError(f"ggml type {q.name} is not supported") from None


def registered_types() -> dict[GGMLQuantizationType, type[QuantType]]:
    """A copy of the registry, in registration order."""
    return dict(_REGISTRY)
