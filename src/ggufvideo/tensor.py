"""``GGMLTensor``: a torch.Tensor subclass that keeps a weight as its raw ggml blocks.

Design (after torchao's quantized tensors): a *wrapper* subclass. The outer tensor carries the
logical shape and the compute dtype (what the weight dequantizes to); the only inner tensor is the
uint8 block storage. So

* ``nn.Module`` shape checks, ``state_dict`` keys and ``isinstance(p, torch.Tensor)`` see the weight
  as it will be used;
* ``.to(device)``/``.cuda()``/``.pin_memory()`` move the raw blocks, nothing is decoded;
* ``.to(torch.bfloat16)``/``.half()`` change only the compute dtype: raw bytes are never
  reinterpreted;
* ``__tensor_flatten__``/``__tensor_unflatten__`` let ``torch.compile`` trace through it;
* any other aten op on it dequantizes first (correct, if not fast), so code that is unaware of the
  subclass still computes the right thing. Quant-aware layers call :meth:`GGMLTensor.dequantize`
  explicitly instead.

Supported aten ops live in a table filled by the ``@_implements`` decorator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, SupportsIndex

import torch
from gguf import GGMLQuantizationType
from torch.utils._pytree import tree_map

from .errors import QuantizationError, TensorOperationError
from .quants import dequantize as _dequantize_rows
from .quants import get_quant_type, to_qtype

__all__ = ["GGMLTensor"]

aten = torch.ops.aten
_OPS: dict[Any, Callable[..., Any]] = {}


def _implements(*ops: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for op in ops:
            _OPS[op] = fn
        return fn

    return register


class GGMLTensor(torch.Tensor):
    """A weight kept as ggml blocks, dequantized on demand.

    Args:
        data: uint8 tensor of the raw blocks. Usually ``(*shape[:-1], row_bytes)``; any shape
            holding exactly the blocks of ``shape``'s elements is accepted (files that stored a
            >4-D tensor flattened keep their stored block layout).
        qtype: the ggml type (enum, name or id).
        shape: the logical shape (what :meth:`dequantize` returns).
        dtype: the compute dtype: the default output of :meth:`dequantize` and what ``.dtype``
            reports. A floating dtype.

    Attributes:
        qtype: the ggml type.
        raw: the uint8 block storage (``.raw.nbytes`` is the memory the weight really takes).
    """

    _data: torch.Tensor
    qtype: GGMLQuantizationType

    # Results of torch functions on this tensor must not be re-wrapped as GGMLTensor. torch checks
    # for this very function object, but its stub is a plain 4-argument function, not the
    # classmethod that Tensor declares.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, data: torch.Tensor, qtype: GGMLQuantizationType | str | int | None = None,
                shape: torch.Size | tuple[int, ...] | None = None, dtype: torch.dtype | None = None,
                requires_grad: bool = False) -> GGMLTensor:
        if qtype is None:  # GGMLTensor(other, requires_grad=...): see __init__
            if not isinstance(data, GGMLTensor):
                raise TensorOperationError(
                    "GGMLTensor(data) without a qtype needs a GGMLTensor, got a plain "
                    f"{data.dtype} tensor; pass the raw uint8 blocks with qtype= and shape=")
            shape, dtype = data.shape, dtype or data.dtype
        if shape is None:
            raise TensorOperationError("GGMLTensor(raw, qtype) needs the logical shape= as well")
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, torch.Size(shape), dtype=dtype or torch.float32, device=data.device,
            requires_grad=requires_grad)

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType | str | int | None = None,
                 shape: torch.Size | tuple[int, ...] | None = None,
                 dtype: torch.dtype | None = None, requires_grad: bool = False) -> None:
        if qtype is None:
            # ``type(param)(value, requires_grad=...)``: the nn.Parameter-style constructor that
            # accelerate (``set_module_tensor_to_device``) and others call on a parameter's class.
            # Shares ``data``'s raw blocks and, like ``nn.Parameter(...)``, marks a parameter.
            assert isinstance(data, GGMLTensor)
            self._data = data._data
            self.qtype = data.qtype
            self._is_param = True
            return
        dtype = dtype or torch.float32
        q = to_qtype(qtype)
        qt = get_quant_type(q)
        if data.dtype != torch.uint8:
            raise QuantizationError(
                f"GGMLTensor({q.name}): raw data must be uint8, got {data.dtype}")
        if not dtype.is_floating_point:
            raise QuantizationError(
                f"GGMLTensor({q.name}): compute dtype must be floating, got {dtype}")
        assert shape is not None  # __new__ raised otherwise
        shape = torch.Size(shape)
        n = shape.numel()
        expected = n // qt.block_size * qt.type_size()
        if n % qt.block_size or data.numel() != expected:
            raise QuantizationError(
                f"GGMLTensor({q.name}): shape {list(shape)} needs {expected} bytes of "
                f"{qt.block_size}-element blocks, got raw data of shape {list(data.shape)}")
        self._data = data
        self.qtype = q

    # -- public API -------------------------------------------------------------------------
    @property
    def raw(self) -> torch.Tensor:
        """The uint8 block storage."""
        return self._data

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes the weight really occupies: its raw blocks (not ``numel * element_size``).

        Memory managers (ComfyUI's, accelerate's) size offloading decisions by ``.nbytes``.
        """
        return self._data.nbytes

    @property
    def logical_shape(self) -> torch.Size:
        """The shape the weight dequantizes to (same as ``.shape``)."""
        return self.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """Decode to a plain tensor of the logical shape.

        Args:
            dtype: output dtype; defaults to this tensor's compute dtype (``.dtype``). float32 is
                bit-identical to ggml; float16/bfloat16 are the exact value rounded once.
        """
        out = _dequantize_rows(self._data, self.qtype, dtype=dtype or self.dtype)
        return out.reshape(self.shape)

    # Same signature as Tensor.__repr__; mypy drops the names of a dunder method's parameters, so
    # no keyword-only override of it can match (not even an identical one).
    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]  # noqa: D105
        dev = f", device='{self.device}'" if self.device.type != "cpu" else ""
        return (f"GGMLTensor(qtype={self.qtype.name}, shape={list(self.shape)}, "
                f"dtype={self.dtype}{dev}, raw={_human_bytes(self._data.nbytes)})")

    # -- storage-level protocol: what code written for plain tensors touches -------------------
    @property  # type: ignore[override]
    def data(self) -> GGMLTensor:
        """A detached alias sharing the raw blocks (as ``Tensor.data``)."""
        return self._rewrap(self._data)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # ``param.data = moved`` is how diffusers' group offloading (and older accelerate code)
        # moves a weight. The C-level setter would only swap the outer wrapper, leaving the raw
        # blocks where they were (a "cuda" weight read from host memory); swap them here.
        if not isinstance(new, GGMLTensor) or new.shape != self.shape:
            found = (f"a {new.qtype.name} GGMLTensor {list(new.shape)}"
                     if isinstance(new, GGMLTensor)
                     else f"a plain {new.dtype} tensor {list(new.shape)}")
            raise TensorOperationError(
                f"cannot set .data of a {self.qtype.name} GGMLTensor {list(self.shape)} to "
                f"{found}: only a GGMLTensor of the same logical shape can replace its raw blocks")
        if new.device == self.device and new.dtype == self.dtype:
            self._data = new._data
            self.qtype = new.qtype
            return
        # Another device or dtype: the outer wrapper's metadata changes too. Swap with a fresh
        # alias of ``new`` (``new`` itself is left as it is: callers keep it, e.g. as a pinned
        # host copy), carrying over this tensor's own attributes (nn.Parameter's marker).
        alias = new._rewrap(new._data)
        alias.requires_grad_(self.requires_grad)
        for k, v in self.__dict__.items():
            if k not in ("_data", "qtype"):
                setattr(alias, k, v)
        torch.utils.swap_tensors(self, alias)

    def data_ptr(self) -> int:
        """Address of the raw blocks (``.raw.data_ptr()``): unique per weight, shared by tied ones.

        Code that uses it as an identity (accelerate's tied-parameter maps) works; code that reads
        ``numel() * element_size()`` bytes from it would read the blocks wrongly, and serializers
        that do so are stopped earlier by :meth:`storage`.
        """
        return self._data.data_ptr()

    def storage(self) -> Any:  # type: ignore[override]
        """Raises :class:`~ggufvideo.TensorOperationError`: the logical elements have no storage.

        safetensors (``save_file``, ``save_pretrained``) reaches here: it would write the raw
        blocks as if they were ``numel()`` elements of ``.dtype``. Save with
        :func:`ggufvideo.save_state_dict` (GGUF keeps the blocks), or ``dequantize()`` first.
        """
        raise TensorOperationError(
            f"a quantized GGMLTensor ({self.qtype.name} {list(self.shape)}) has no storage of "
            f"{self.dtype} elements, so it cannot be saved by safetensors/save_pretrained: save it "
            "with ggufvideo.save_state_dict (GGUF keeps the raw blocks) or dequantize() it first")

    def share_memory_(self) -> GGMLTensor:
        """Move the raw blocks to shared memory (for ``torch.multiprocessing``), in place."""
        self._data.share_memory_()
        return self

    def is_shared(self) -> bool:
        """Whether the raw blocks are in shared memory."""
        return self._data.is_shared()

    def _stable_hash_for_caching(self) -> str:
        # torch.compile's AOT cache key: metadata only, like a plain tensor's key.
        d = self._data
        return (f"GGMLTensor|{self.qtype.name}|{self.dtype}|{tuple(self.shape)}|{tuple(d.shape)}|"
                f"{d.stride()}|{d.device.type}|{self.requires_grad}")

    # -- tensor subclass protocol (torch.compile) -------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple[GGMLQuantizationType, torch.dtype]]:
        return ["_data"], (self.qtype, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx: tuple[GGMLQuantizationType,
                             torch.dtype], outer_size: torch.Size, outer_stride: Any) -> GGMLTensor:
        qtype, dtype = ctx
        return GGMLTensor(inner["_data"], qtype, outer_size, dtype)

    def _rewrap(self, data: torch.Tensor, dtype: torch.dtype | None = None) -> GGMLTensor:
        return GGMLTensor(data, self.qtype, self.shape, dtype or self.dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> GGMLTensor:
        new = self._rewrap(self._data.clone())
        new.requires_grad_(self.requires_grad)
        memo[id(self)] = new
        # Keep extra state such as nn.Parameter's ``_is_param`` marker.
        for k, v in self.__dict__.items():
            if k not in ("_data", "qtype"):
                setattr(new, k, copy.deepcopy(v, memo))
        return new

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        return (_rebuild, (self._data, self.qtype.value, tuple(self.shape), self.dtype))

    # Tensor's stub declares __torch_dispatch__ as a plain function attribute (torch's disabled
    # implementation), which mypy binds as a method; torch's protocol is this classmethod.
    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        impl = _OPS.get(func)
        if impl is not None:
            return impl(func, args, kwargs)
        if func._schema.is_mutable:
            raise TensorOperationError(
                f"in-place operation {func} is not supported on a quantized GGMLTensor; "
                "dequantize() it first. To fuse a LoRA into quantized weights (diffusers' "
                "fuse_lora / peft's merge do `weight += delta`), use ggufvideo.fuse_lora "
                "(requantizes each touched weight to its own type) or bake it into a new file "
                "with `ggufvideo convert SRC DST --lora FILE`; ggufvideo.apply_lora runs it "
                "unmerged")
        # Anything else: compute on the dequantized values (a plain tensor comes back).
        def unwrap(t: Any) -> Any:
            return t.dequantize() if isinstance(t, GGMLTensor) else t

        if getattr(func, "is_view", False) and torch.is_inference_mode_enabled():
            # A view op's result is marked a view of its input after this returns, which torch
            # refuses for a tensor made under inference mode ("Cannot set version_counter for
            # inference tensor": diffusers' Wan 2.2 TI2V blocks take
            # scale_shift_table.unsqueeze(0) inside the pipeline's inference mode). The values
            # are a fresh decode either way; made outside inference mode, they can be marked.
            with torch.inference_mode(False):
                return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _rebuild(data: torch.Tensor, qtype: int, shape: tuple[int, ...],
             dtype: torch.dtype) -> GGMLTensor:
    """Unpickle a GGMLTensor. Checked like any construction (type id, sizes), so it is safe to
    allow under ``torch.load(weights_only=True)``: it builds nothing but a GGMLTensor from a uint8
    tensor, an int, a tuple of ints and a dtype."""
    if (not isinstance(data, torch.Tensor) or not isinstance(qtype, int)
            or not isinstance(dtype, torch.dtype)
            or not all(isinstance(d, int) for d in shape)):
        raise TensorOperationError("malformed pickled GGMLTensor")
    return GGMLTensor(data, qtype, shape, dtype)


# torch.load(..., weights_only=True) of a state dict holding GGMLTensors works out of the box.
torch.serialization.add_safe_globals([_rebuild])


@_implements(aten.detach.default, aten.alias.default)
def _detach(func: Any, args: Any, kwargs: Any) -> GGMLTensor:
    t: GGMLTensor = args[0]
    return t._rewrap(func(t._data))


@_implements(aten.clone.default)
def _clone(func: Any, args: Any, kwargs: Any) -> GGMLTensor:
    t: GGMLTensor = args[0]
    return t._rewrap(t._data.clone())


@_implements(aten._to_copy.default)
def _to_copy(func: Any, args: Any, kwargs: Any) -> torch.Tensor:
    t: GGMLTensor = args[0]
    dtype = kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        # An integer/bool view of a weight only makes sense of its values.
        return t.dequantize(torch.float32).to(dtype=dtype, device=kwargs.get("device"))
    data = t._data
    device = kwargs.get("device")
    if device is not None or kwargs.get("pin_memory"):
        data = aten._to_copy.default(data, device=device, pin_memory=kwargs.get("pin_memory"),
                                     non_blocking=kwargs.get("non_blocking", False))
    elif dtype is None:
        data = data.clone()  # _to_copy always copies
    return t._rewrap(data, dtype)


@_implements(aten._pin_memory.default)
def _pin(func: Any, args: Any, kwargs: Any) -> GGMLTensor:
    t: GGMLTensor = args[0]
    return t._rewrap(t._data.pin_memory())


@_implements(aten.is_pinned.default)
def _is_pinned(func: Any, args: Any, kwargs: Any) -> bool:
    return bool(args[0]._data.is_pinned())


@_implements(aten.record_stream.default)
def _record_stream(func: Any, args: Any, kwargs: Any) -> None:
    args[0]._data.record_stream(args[1])


@_implements(aten.copy_.default)
def _copy(func: Any, args: Any, kwargs: Any) -> GGMLTensor:
    dst, src = args[0], args[1]
    if not isinstance(dst, GGMLTensor):
        # plain.copy_(ggml): write the values
        return dst.copy_(src.dequantize(dst.dtype))
    if not isinstance(src, GGMLTensor) or src.qtype != dst.qtype or src.shape != dst.shape:
        found = (f"{src.qtype.name} {list(src.shape)}" if isinstance(src, GGMLTensor)
                 else f"a plain {src.dtype} tensor {list(src.shape)}")
        raise TensorOperationError(
            f"cannot copy {found} into a {dst.qtype.name} GGMLTensor {list(dst.shape)}: only raw "
            "blocks of the same type and shape can be copied (re-quantizing is not implicit)")
    dst._data.copy_(src._data.reshape(dst._data.shape),
                    non_blocking=kwargs.get("non_blocking", False))
    return dst


@_implements(aten._has_compatible_shallow_copy_type.default)
def _compatible(func: Any, args: Any, kwargs: Any) -> bool:
    return False
