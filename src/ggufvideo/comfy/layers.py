"""Quant-aware versions of ComfyUI's layer classes.

ComfyUI builds its models from an *operations* class (``comfy.ops.disable_weight_init`` and its
kin: ``ops.Linear``, ``ops.Conv3d``, ``ops.RMSNorm`` ...). Its device management and LoRA patching
talk to those layers through a small protocol:

* ``comfy_cast_weights``: when true, ``forward`` goes through ``forward_comfy_cast_weights``, which
  fetches the weights to the input's device and dtype on every call (the "low VRAM" path);
* ``weight_function`` / ``bias_function``: callables applied to the fetched weight (LoRA patches of
  layers that are not resident, ``LowVramPatch``);
* ``_load_from_state_dict``, ``_conv_forward(..., autopad=...)`` for the Wan VAE's causal convs.

:func:`comfy_quant_class` derives, from any of ComfyUI's layer classes (or a subclass such as the
Wan VAE's ``CausalConv3d``), a class whose MRO puts one of the mixins below in front::

    GGUFVideoLinear -> _LinearMixin -> _ComfyQuantLayer -> QuantLayer -> ops.Linear -> nn.Linear

Each mixin keeps ComfyUI's protocol and changes only *how a weight is fetched*: the raw ggml blocks
move to the input's device (never a decoded copy: weights move as raw blocks), are decoded there by
:func:`ggufvideo.ops.dequantize_weight` (or, for a linear without patches, go through
:func:`ggufvideo.ops.quant_linear`, the fused-kernel hook), then LoRA patches are applied to the
decoded weight of *this layer only*, in float32.

Nothing here imports ComfyUI: the mixins are plain torch, and ComfyUI's classes arrive as
arguments. That is what lets the layer logic be tested without ComfyUI installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import QuantLayer, dequantize_weight, lora_linear, quant_linear
from ..tensor import GGMLTensor

__all__ = [
    "comfy_quant_class",
    "quantize_module_classes",
    "ComfyQuantLayer",
    "fetch_weight",
    "raw_state_bytes",
]

#: A patch that rewrites a decoded weight (LoRA): ``fn(weight) -> weight``.
WeightFn = Callable[[torch.Tensor], torch.Tensor]


def fetch_weight(t: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                 patches: Sequence[WeightFn] = ()) -> torch.Tensor | None:
    """A layer's weight (or bias) made ready for compute on ``device`` in ``dtype``.

    Quantized weights are moved as raw blocks and decoded on ``device``. With ``patches`` the
    weight is decoded to float32, each patch is applied in turn, and the result is rounded once to
    ``dtype`` (LoRA deltas are small: adding them in half precision would lose them).
    """
    if t is None:
        return None
    stored = t
    if t.device != device:
        # Pinned host memory makes this an asynchronous copy; it is ordered before the decode
        # below on the same stream.
        t = t.to(device, non_blocking=True)
    if not patches:
        return dequantize_weight(t, dtype)
    w = dequantize_weight(t, torch.float32)
    if not isinstance(stored, GGMLTensor) and w.data_ptr() == stored.data_ptr():
        # A plain float32 weight comes back as itself, and ComfyUI's patch functions work in
        # place (calculate_weight adds into its argument): patch a copy, never the parameter.
        w = w.clone()
    for fn in patches:
        w = fn(w)
    return w if w.dtype == dtype else w.to(dtype)


def raw_state_bytes(module: nn.Module) -> int:
    """Bytes of ``module.state_dict()`` as really held: raw blocks for quantized tensors.

    ComfyUI sizes models with ``tensor.nbytes``, which for a :class:`GGMLTensor` is the size of its
    *decoded* form (it reports the logical shape and compute dtype); the memory manager needs this.
    """
    total = 0
    for t in module.state_dict(keep_vars=True).values():
        if t is None or t.device.type == "meta":
            continue
        total += t.raw.nbytes if isinstance(t, GGMLTensor) else t.nbytes
    return total


class ComfyQuantLayer(QuantLayer):
    """Base of the ComfyUI-facing quant-aware layers (mixed in front of a ComfyUI layer class).

    No ``forward`` is defined here: ComfyUI's layer ``forward`` (reached through a subclass's own
    ``forward``, such as the Wan VAE's causal padding) sends the call to
    ``forward_comfy_cast_weights`` because ``comfy_cast_weights`` is true.

    Attributes:
        comfy_cast_weights: always true: weights are fetched (moved as raw blocks, decoded) on every
            call, which is ComfyUI's own low-VRAM protocol.
        ggufvideo_patches: param name -> deferred LoRA patch installed by the adapter's model
            patcher (see :mod:`ggufvideo.comfy.patcher`); a patch applies only while it is valid.
    """

    comfy_cast_weights = True
    #: Shapes the constructor declared, checked when weights are assigned (weights start empty).
    _ggufvideo_shapes: dict[str, tuple[int, ...]]
    #: The ComfyUI class this one was derived from (for pickling/deepcopy).
    _ggufvideo_base: type[nn.Module]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Build on the meta device and drop the parameters: a 14B model must never allocate its
        # full-precision weights, only to replace them with the quantized ones (ComfyUI may also
        # move the model to its offload device before loading, which meta tensors cannot do).
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
        self._ggufvideo_shapes = {name: tuple(p.shape) for name, p in self._parameters.items()
                                  if p is not None}
        for name in self._ggufvideo_shapes:
            self._parameters[name] = None
        self._init_comfy_state()

    def _init_comfy_state(self) -> None:
        # Per-instance lists: ComfyUI appends to them, and the class-level defaults are shared.
        self.weight_function: list[WeightFn] = []
        self.bias_function: list[WeightFn] = []
        self.ggufvideo_patches: dict[str, Any] = {}

    def _patches_for(self, name: str) -> list[WeightFn]:
        fns: list[WeightFn] = []
        deferred = getattr(self, "ggufvideo_patches", {}).get(name)
        if deferred is not None and deferred.active() and self._unmerged_lora(name) is None:
            fns.append(deferred)
        # ComfyUI's dynamic-VRAM loader attaches its LoRA patch as ``<name>_lowvram_function``
        # and applies it when the weight is not cached on the GPU; these layers never cache a
        # decoded weight, so it always applies.
        lowvram = getattr(self, f"{name}_lowvram_function", None)
        if lowvram is not None:
            fns.append(lowvram)
        fns.extend(getattr(self, f"{name}_function", ()))
        return fns

    def _unmerged_lora(self, name: str = "weight") -> list[Any] | None:
        """The adapters of an active LoRA-only patch on ``name`` (run unmerged), else ``None``."""
        deferred = getattr(self, "ggufvideo_patches", {}).get(name)
        if deferred is None or not hasattr(deferred, "adapters") or not deferred.active():
            return None
        return deferred.adapters()

    def _param(self, name: str) -> torch.Tensor | None:
        t = self._parameters.get(name)
        if t is None and name in getattr(self, "_ggufvideo_shapes", {}):
            raise RuntimeError(f"{type(self).__name__}: parameter {name!r} was never loaded (the "
                               "GGUF file has no tensor for it)")
        return t

    def _fetch(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return fetch_weight(self._param(name), dtype, device, self._patches_for(name))

    def _fetch_all(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                       torch.Tensor | None]:
        x, dtype = self._cast_input(input)
        return x, self._fetch("weight", dtype, x.device), self._fetch("bias", dtype, x.device)

    # -- loading ----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # Assign, never copy: copying a GGMLTensor into a float parameter would decode it.
        shapes = getattr(self, "_ggufvideo_shapes", {})
        for name in ("weight", "bias"):
            if name not in self._parameters:
                continue
            key = prefix + name
            current = self._parameters[name]
            expected = shapes.get(name) or (tuple(current.shape) if current is not None else None)
            if key not in state_dict:
                if expected is not None:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                error_msgs.append(f"{key}: expected a tensor, found {type(value).__name__}")
                continue
            if expected is not None and tuple(value.shape) != expected:
                error_msgs.append(f"size mismatch for {key}: the file has shape "
                                  f"{list(value.shape)}, the model expects {list(expected)}")
                continue
            self._parameters[name] = nn.Parameter(value, requires_grad=False)
        if strict:
            local = set(self._parameters) | set(self._buffers)
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] \
                        and key[len(prefix):] not in local:
                    unexpected_keys.append(key)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Derived classes are made at run time: rebuild them from the ComfyUI class (deepcopy).
        return (_restore, (self._ggufvideo_base,), self.__dict__)


def _restore(base: type[nn.Module]) -> nn.Module:
    cls = comfy_quant_class(base)
    return cls.__new__(cls)


class _LinearMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, dtype = self._cast_input(input)
        w, b = self._param("weight"), self._param("bias")
        adapters = self._unmerged_lora("weight")
        if (isinstance(w, GGMLTensor) and not self._patches_for("weight")
                and not self._patches_for("bias")):
            # Unpatched, or LoRA-only (adapters beside the weight): the fused dequantize+matmul
            # hook sees the raw blocks.
            w = w if w.device == x.device else w.to(x.device, non_blocking=True)
            if b is not None and b.device != x.device:
                b = b.to(x.device, non_blocking=True)
            if adapters:
                return lora_linear(x, w, b, adapters, owner=self)
            return quant_linear(x, w, b)
        y = F.linear(x, self._fetch("weight", dtype, x.device),
                     self._fetch("bias", dtype, x.device))
        for a in adapters or ():
            y = y + a.delta(x)
        return y


class _ConvMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor,  # noqa: D102
                                   *args: Any, **kwargs: Any) -> torch.Tensor:
        x, w, b = self._fetch_all(input)
        # ComfyUI's Conv3d._conv_forward takes ``autopad`` (the Wan VAE's causal fast path slices
        # the decoded weight); torch's takes none.
        return self._conv_forward(x, w, b, *args, **kwargs)  # type: ignore[attr-defined]


class _ConvTransposeMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor,  # noqa: D102
                                   output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__}: only padding_mode='zeros' is supported")
        x, w, b = self._fetch_all(input)
        n = len(self.kernel_size)  # type: ignore[attr-defined]
        functional = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x, output_size, self.stride, self.padding, self.kernel_size,  # type: ignore[attr-defined]
            n, self.dilation)  # type: ignore[attr-defined]
        return functional(x, w, b, self.stride, self.padding, output_padding,  # type: ignore[attr-defined]
                          self.groups, self.dilation)  # type: ignore[attr-defined]


class _GroupNormMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, w, b = self._fetch_all(input)
        return F.group_norm(x, self.num_groups, w, b, self.eps)  # type: ignore[attr-defined]


class _LayerNormMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, w, b = self._fetch_all(input)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)  # type: ignore[attr-defined]


class _RMSNormMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x, w, _ = self._fetch_all(input)
        shape = tuple(w.shape) if w is not None else (x.shape[-1],)
        return F.rms_norm(x, shape, w, self.eps)  # type: ignore[attr-defined]


class _EmbeddingMixin(ComfyQuantLayer):
    def forward_comfy_cast_weights(self, input: torch.Tensor,  # noqa: D102
                                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self._param("weight")
        dtype = out_dtype or self.compute_dtype or (w.dtype if w is not None else torch.float32)
        if w is not None and not self._patches_for("weight") and self.max_norm is None:  # type: ignore[attr-defined]
            # Only the looked-up rows are decoded.
            w = w if w.device == input.device else w.to(input.device, non_blocking=True)
            return dequantize_weight(w, dtype, rows=input)
        return F.embedding(input, self._fetch("weight", dtype, input.device), self.padding_idx,  # type: ignore[attr-defined]
                           self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)  # type: ignore[attr-defined]


# torch layer -> mixin. ConvTranspose is checked before Conv (both derive from _ConvNd, but the
# concrete torch classes below are disjoint).
_MIXIN_OF: tuple[tuple[type[nn.Module], type[ComfyQuantLayer]], ...] = (
    (nn.Linear, _LinearMixin),
    (nn.ConvTranspose1d, _ConvTransposeMixin),
    (nn.ConvTranspose2d, _ConvTransposeMixin),
    (nn.ConvTranspose3d, _ConvTransposeMixin),
    (nn.Conv1d, _ConvMixin),
    (nn.Conv2d, _ConvMixin),
    (nn.Conv3d, _ConvMixin),
    (nn.GroupNorm, _GroupNormMixin),
    (nn.LayerNorm, _LayerNormMixin),
    (nn.RMSNorm, _RMSNormMixin),
    (nn.Embedding, _EmbeddingMixin),
)

_DERIVED: dict[type[nn.Module], type[nn.Module] | None] = {}


def comfy_quant_class(base: type[nn.Module]) -> type[nn.Module] | None:
    """The quant-aware class derived from ComfyUI layer class ``base``, or ``None``.

    ``base`` is any class derived from a torch layer (``comfy.ops.disable_weight_init.Linear``,
    the Wan VAE's ``CausalConv3d`` ...). The result subclasses ``base`` (so ``isinstance``,
    ``state_dict`` keys and ``base``'s own ``forward`` keep working) with the matching mixin in
    front. Created once per class and cached. ``None`` for classes with no torch layer in their
    MRO, or whose MRO cannot take the mixin.
    """
    if issubclass(base, ComfyQuantLayer):
        return base
    if base in _DERIVED:
        return _DERIVED[base]
    mixin = next((m for torch_cls, m in _MIXIN_OF if issubclass(base, torch_cls)), None)
    derived: type[nn.Module] | None = None
    if mixin is not None:
        try:
            derived = type(f"GGUFVideo{base.__name__}", (mixin, base),
                           {"__module__": __name__, "__doc__": base.__doc__,
                            "_ggufvideo_base": base})
        except TypeError:
            derived = None
    _DERIVED[base] = derived
    return derived


def quantize_module_classes(module: nn.Module, names: set[str] | None = None) -> int:
    """Switch already-built layers of ``module`` to their quant-aware classes, in place.

    Used where ComfyUI builds a model itself (the VAE) instead of taking our operations: each
    layer's class becomes :func:`comfy_quant_class` of its class, keeping its parameters. Only
    layers whose qualified names are in ``names`` are switched (``None``: all that can be).

    Returns:
        The number of layers switched.
    """
    n = 0
    for name, m in module.named_modules():
        if names is not None and name not in names:
            continue
        cls = comfy_quant_class(type(m))
        if cls is None or type(m) is cls:
            continue
        m.__class__ = cls
        cls._init_comfy_state(m)  # type: ignore[attr-defined]
        n += 1
    return n
