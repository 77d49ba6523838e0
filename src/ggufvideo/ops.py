"""Quant-aware layers: weights stay as ggml blocks and are decoded layer by layer in ``forward``.

Every torch layer type a video model is built from has a quant-aware subclass here
(:class:`QuantLinear`, :class:`QuantConv1d`/``2d``/``3d``, :class:`QuantConvTranspose1d`/``2d``/
``3d``, :class:`QuantEmbedding`, :class:`QuantLayerNorm`, :class:`QuantGroupNorm`,
:class:`QuantRMSNorm`). Each one's weight and bias may be a :class:`~ggufvideo.GGMLTensor` or a
plain tensor; ``forward`` decodes them to the compute dtype and calls the functional op.

Why the layers are *inserted under* a model's own classes rather than replacing them: real
architectures subclass the torch layers with forwards of their own (diffusers' ``WanCausalConv3d``
is an ``nn.Conv3d`` that pads causally and keeps a feature cache, then calls ``super().forward``).
Replacing such a module by a plain quant layer would silently drop that forward. So
:func:`swap_quant_layers` changes each module's class to a subclass of *its own class* whose MRO
places the quant layer between the model's class and the torch layer::

    QuantWanCausalConv3d -> WanCausalConv3d -> QuantConv3d -> nn.Conv3d -> ...

``WanCausalConv3d.forward`` runs unchanged and its ``super().forward`` reaches ``QuantConv3d``.
``isinstance`` (against the model's class, the torch layer and the quant layer), hooks, parameter
names and ``state_dict`` keys are all untouched: only ``__class__`` changes. The derived classes are
created once per original class and cached; they hold no state.

Code that bypasses the layer's forward and uses ``self.weight`` directly (diffusers'
``FP32LayerNorm`` calls ``F.layer_norm`` itself) still computes the right thing: any torch op on a
``GGMLTensor`` dequantizes it first (to its own compute dtype).

Compute dtype: by default a layer decodes its weights to the dtype of its input, so a model runs
in whatever precision its inputs have. A layer's ``compute_dtype`` attribute (set per instance with
:func:`set_compute_dtype`, never on a class) fixes it instead: the input is cast to it and the
output comes back in it, as under autocast.

Where a GPU fast path plugs in: every weight decode goes through :func:`dequantize_weight` and every
quantized linear through :func:`quant_linear`. Fused dequant+matmul kernels replace the body of
:func:`quant_linear`; faster decoders replace the body of :func:`dequantize_weight`. Nothing else in
the package decodes a layer's weight.

The GPU fast path is wired in: on CUDA, both hooks use the Triton kernels of
:mod:`ggufvideo.kernels` (bit-identical decoding into a reused buffer, then cuBLAS; an opt-in
fused kernel for few activation rows) when triton is installed. ``GGUFVIDEO_NO_TRITON=1`` in the
environment, or ``ggufvideo.kernels.set_enabled(False)``, forces the torch path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .adapted import lora_conv, lora_linear, set_lora_fusion
from .adapters import Adapter, DoraAdapter, KronAdapter, LoraAdapter, lora_adapters
from .quants import dequantize as _dequantize_rows
from .quants import get_quant_type
from .tensor import GGMLTensor

__all__ = [
    "QuantLayer",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantEmbedding",
    "QuantLayerNorm",
    "QuantGroupNorm",
    "QuantRMSNorm",
    "dequantize_weight",
    "quant_linear",
    "quant_class_for",
    "swap_quant_layers",
    "set_compute_dtype",
    "Adapter",
    "DoraAdapter",
    "KronAdapter",
    "LoraAdapter",
    "lora_adapters",
    "lora_conv",
    "lora_linear",
    "set_lora_fusion",
]


# -- the two hooks -------------------------------------------------------------------------------
def dequantize_weight(weight: torch.Tensor, dtype: torch.dtype, *,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a layer's weight (or bias) to a plain tensor of ``dtype``.

    The single place where the layers decode a weight: a faster decoder (a GPU kernel) plugs in
    here. float32 output is bit-identical to ggml; float16/bfloat16 are the exact value rounded
    once.

    Args:
        weight: a :class:`GGMLTensor` or a plain tensor (then only cast, without a copy when it
            already has ``dtype``).
        dtype: the output dtype.
        rows: an integer index tensor; when given, only those rows (slices along dim 0) are decoded
            and the result has shape ``(*rows.shape, *weight.shape[1:])`` (an embedding lookup:
            a 256k-token vocabulary is never decoded whole).
    """
    if rows is not None:
        return _dequantize_rows_of(weight, rows, dtype)
    if isinstance(weight, GGMLTensor):
        kernels = _gpu_kernels(weight)
        if kernels is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
            return kernels.dequantize(weight.raw, weight.qtype, weight.shape, dtype)
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a possibly quantized weight and bias, computed in ``x.dtype``.

    The single place every quant-aware linear goes through: a fused dequantize+matmul kernel (which
    reads ``weight.raw`` and ``weight.qtype`` and never materializes the decoded weight) plugs in
    here. The reference path decodes the weight with :func:`dequantize_weight` and calls
    ``F.linear``, so its result is bit-identical to a plain ``nn.Linear`` holding the decoded
    weight in ``x.dtype``.
    """
    kernels = _gpu_kernels(weight) if isinstance(weight, GGMLTensor) else None
    if kernels is not None and weight.dim() == 2 and x.is_floating_point():
        b = None if bias is None else dequantize_weight(bias, x.dtype)
        return kernels.linear(x, weight.raw, weight.qtype,  # type: ignore[attr-defined]
                              weight.shape[0], b)
    w = dequantize_weight(weight, x.dtype)
    b = None if bias is None else dequantize_weight(bias, x.dtype)
    return F.linear(x, w, b)


def _gpu_kernels(weight: GGMLTensor) -> Any:
    """:mod:`ggufvideo.kernels` if its Triton path runs for this CUDA weight's type, else
    ``None``."""
    if weight.device.type != "cuda":
        return None
    from . import kernels  # torch-only import; triton loads when a kernel first runs

    return kernels if kernels.is_available(weight.device, weight.qtype) else None


def _dequantize_rows_of(weight: torch.Tensor, rows: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(weight, GGMLTensor):
        picked = weight[rows]
        return picked if picked.dtype == dtype else picked.to(dtype)
    n_rows = weight.shape[0]
    row_elems = weight.shape[1:].numel()
    raw = weight.raw
    # Rows can be gathered from the raw blocks only when no block straddles two rows.
    if n_rows == 0 or row_elems % get_quant_type(weight.qtype).block_size:
        return weight.dequantize(dtype)[rows]
    picked = raw.reshape(n_rows, -1)[rows.reshape(-1)]
    out = _dequantize_rows(picked, weight.qtype, dtype=dtype)
    return out.reshape(*rows.shape, *weight.shape[1:])


# -- the layers ----------------------------------------------------------------------------------
class QuantLayer(nn.Module):
    """Marker base of the quant-aware layers (mixed in under a torch layer class).

    Attributes:
        compute_dtype: ``None`` (decode to the input's dtype) or the dtype this layer computes in.
            A per-instance setting; the class-level ``None`` is only the default.
    """

    compute_dtype: torch.dtype | None = None
    #: The class this layer was swapped from (the torch layer itself for the plain quant classes).
    _ggml_original_class: ClassVar[type[nn.Module]]

    def _dtype_for(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if x.is_floating_point():
            return x.dtype
        w = self._parameters.get("weight")
        return w.dtype if w is not None else torch.get_default_dtype()

    def _cast_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        dtype = self._dtype_for(x)
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        return x, dtype

    def _decoded(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        t = getattr(self, name)
        return None if t is None else dequantize_weight(t, dtype)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Derived classes are created at run time and cannot be found by name when unpickling:
        # rebuild them from the original class instead (pickle, torch.save, copy.deepcopy).
        return (_restore_quant_module, (self._ggml_original_class,), self.__dict__)


def _restore_quant_module(original: type[nn.Module]) -> nn.Module:
    cls = quant_class_for(original)
    assert cls is not None
    return cls.__new__(cls)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` whose weight/bias may be :class:`GGMLTensor`; see :func:`quant_linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, _ = self._cast_input(input)
        adapters = self.__dict__.get("lora_adapters")
        if adapters:
            return lora_linear(x, self.weight, self.bias, adapters, owner=self)
        return quant_linear(x, self.weight, self.bias)


class _QuantConvNd(QuantLayer):
    weight: torch.Tensor  # mixed in under nn.Conv{1,2,3}d, which sets it

    # nn.Conv{1,2,3}d.forward calls self._conv_forward(input, self.weight, self.bias): decoding
    # there also covers subclasses whose own forward ends in super().forward (WanCausalConv3d).
    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        x, dtype = self._cast_input(input)
        w = dequantize_weight(weight, dtype)
        b = None if bias is None else dequantize_weight(bias, dtype)
        adapters = self.__dict__.get("lora_adapters")
        if adapters:
            return lora_conv(self, x, w, b, adapters)
        return self._torch_conv_forward(x, w, b)

    def _torch_conv_forward(self, x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
        """The torch conv class's own ``_conv_forward``: no decoding, no adapters."""
        # mypy cannot see the torch conv class this mixin is placed before in the MRO.
        return super()._conv_forward(x, weight, bias)  # type: ignore[misc]


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a possibly quantized weight/bias."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a possibly quantized weight/bias."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """``nn.Conv3d`` with a possibly quantized weight/bias (Wan's patch embedding, the VAE)."""


class _QuantConvTransposeNd(QuantLayer):
    _spatial_dims: ClassVar[int]
    _functional: ClassVar[Any]

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:  # noqa: D102
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__}: only padding_mode='zeros' is supported, "
                             f"got {self.padding_mode!r}")
        x, dtype = self._cast_input(input)
        output_padding = self._output_padding(  # type: ignore[attr-defined,operator]
            x, output_size, self.stride, self.padding, self.kernel_size, self._spatial_dims,
            self.dilation)
        return type(self)._functional(x, self._decoded("weight", dtype),
                                      self._decoded("bias", dtype),
                                      self.stride, output_padding=output_padding,
                                      padding=self.padding, groups=self.groups,
                                      dilation=self.dilation)


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a possibly quantized weight/bias."""

    _spatial_dims = 1
    _functional = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a possibly quantized weight/bias."""

    _spatial_dims = 2
    _functional = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a possibly quantized weight/bias."""

    _spatial_dims = 3
    _functional = staticmethod(F.conv_transpose3d)


class QuantEmbedding(QuantLayer, nn.Embedding):
    """``nn.Embedding`` that decodes only the looked-up rows of a quantized table.

    The output dtype is ``compute_dtype`` when set, else the weight's (compute) dtype. With
    ``max_norm`` set the whole table is decoded and renormalized rows are not written back (the
    quantized table cannot be updated in place).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dtype = self.compute_dtype or self.weight.dtype
        if self.max_norm is None:
            return dequantize_weight(self.weight, dtype, rows=input)
        return F.embedding(input, dequantize_weight(self.weight, dtype).clone(), self.padding_idx,
                           self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


class QuantLayerNorm(QuantLayer, nn.LayerNorm):
    """``nn.LayerNorm`` with a possibly quantized affine weight/bias."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, dtype = self._cast_input(input)
        return F.layer_norm(x, self.normalized_shape, self._decoded("weight", dtype),
                            self._decoded("bias", dtype), self.eps)


class QuantGroupNorm(QuantLayer, nn.GroupNorm):
    """``nn.GroupNorm`` with a possibly quantized affine weight/bias."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, dtype = self._cast_input(input)
        return F.group_norm(x, self.num_groups, self._decoded("weight", dtype),
                            self._decoded("bias", dtype), self.eps)


class QuantRMSNorm(QuantLayer, nn.RMSNorm):
    """``nn.RMSNorm`` with a possibly quantized weight."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, dtype = self._cast_input(input)
        return F.rms_norm(x, self.normalized_shape, self._decoded("weight", dtype), self.eps)


# torch layer -> its quant-aware subclass. Order does not matter: none of these is a subclass of
# another (ConvTransposeNd derive from _ConvNd, not from ConvNd).
_QUANT_OF: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
    nn.Embedding: QuantEmbedding,
    nn.LayerNorm: QuantLayerNorm,
    nn.GroupNorm: QuantGroupNorm,
    nn.RMSNorm: QuantRMSNorm,
}
for _torch_cls, _quant_cls in _QUANT_OF.items():
    _quant_cls._ggml_original_class = _torch_cls

# original (subclass) class -> derived quant class; classes are immutable, so sharing is safe.
_DERIVED: dict[type[nn.Module], type[nn.Module] | None] = {}


def quant_class_for(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The quant-aware class for modules of class ``cls``, or ``None`` if it has none.

    A torch layer maps to its ``Quant*`` class; a subclass of one (``WanCausalConv3d``) maps to a
    class derived from it *and* the quant layer, created once and cached, so that the subclass's
    own ``forward`` keeps running. A quant-aware class maps to itself. Classes whose MRO cannot
    take the quant layer (a conflicting multiple inheritance) map to ``None``: they are left as
    they are, and their quantized weights are decoded by ``GGMLTensor``'s generic fallback.
    """
    if issubclass(cls, QuantLayer):
        return cls
    if cls in _QUANT_OF:
        return _QUANT_OF[cls]
    if cls in _DERIVED:
        return _DERIVED[cls]
    base = next((b for b in cls.__mro__ if b in _QUANT_OF), None)
    derived: type[nn.Module] | None = None
    if base is not None:
        quant = _QUANT_OF[base]
        try:
            derived = type(f"Quant{cls.__name__}", (cls, quant),
                           {"__module__": cls.__module__, "__doc__": cls.__doc__,
                            "_ggml_original_class": cls})
        except TypeError:
            derived = None
    _DERIVED[cls] = derived
    return derived


def swap_quant_layers(module: nn.Module, *, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Make every supported layer in ``module`` (itself included) quant-aware, in place.

    Each module's class is changed to :func:`quant_class_for` of its class; names, parameters,
    buffers, hooks and ``state_dict`` keys are untouched, and a subclass's own ``forward`` still
    runs. Works on modules on any device, meta included. Calling it twice is harmless.

    Args:
        module: the model (or a layer).
        compute_dtype: if given, set as every swapped layer's compute dtype
            (see :func:`set_compute_dtype`).

    Returns:
        ``module`` (for chaining).
    """
    for m in module.modules():
        cls = quant_class_for(type(m))
        if cls is not None and type(m) is not cls:
            # (past nn.Module.__setattr__, whose parameter/buffer/module checks cost ~3 us
            # each and have nothing to check here: ~580 layers in a Wan-14B-sized load)
            object.__setattr__(m, "__class__", cls)
    if compute_dtype is not None:
        set_compute_dtype(module, compute_dtype)
    return module


def set_compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Set the compute dtype of every quant-aware layer in ``module`` (``None``: the input's).

    A per-instance setting: two models loaded from the same file can compute in different dtypes.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"compute dtype must be a floating dtype, got {dtype}")
    for m in module.modules():
        if isinstance(m, QuantLayer):
            m.compute_dtype = dtype
    return module
