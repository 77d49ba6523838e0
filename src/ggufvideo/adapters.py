"""Low-rank adapters beside a quant-aware layer's weight (LoRA, unmerged): the layer-side math.

A :class:`LoraAdapter` lives in a layer's ``lora_adapters`` list;
:class:`~ggufvideo.ops.QuantLinear` and the quant-aware convs add each adapter's term to their
output, so the quantized base weight is never merged or re-decoded for it (peft's idea: adapters
are data beside the base). Reading LoRA files and attaching adapters to a model is
:mod:`ggufvideo.lora`'s job.

This module sits beside :mod:`ggufvideo.ops` and reaches its hooks (``quant_linear``,
``dequantize_weight``, the GPU kernels) through the module at call time, so it imports nothing
from it at load time (``ops`` re-exports the names here).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .tensor import GGMLTensor

if TYPE_CHECKING:
    from .ops import _QuantConvNd

__all__ = ["Adapter", "KronAdapter", "LoraAdapter", "lora_adapters", "lora_linear",
           "set_lora_fusion"]


# -- low-rank adapters beside a layer's weight (LoRA, unmerged) -----------------------------------
_ADAPTER_IDS = itertools.count()
_lora_fusion: bool | None = None  # None: follow GGUFVIDEO_LORA_FUSED (default on)


def _cast_cached(cache: dict[tuple[torch.device, torch.dtype], Any],
                 tensors: tuple[torch.Tensor | None, ...], device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` on ``device`` in ``dtype``, moved and cast once per device/dtype (not cached
    while they are being trained: a cached copy would not follow their updates)."""
    key = (device, dtype)
    got = cache.get(key)
    if got is None:
        got = tuple(None if t is None else t.to(device=device, dtype=dtype) for t in tensors)
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in tensors)):
            cache[key] = got
    return got  # type: ignore[no-any-return]


@dataclass(eq=False)
class LoraAdapter:
    """One adapter beside a layer's weight: the layer adds ``scale * up @ (down @ x)`` to its
    output.

    The base weight is never merged, copied or re-decoded for it (peft's ``LoraLayer`` idea:
    adapters are data beside the base). A layer holds any number of them in its
    ``lora_adapters`` list (see :func:`lora_adapters`); :mod:`ggufvideo.lora` builds them from
    LoRA files.

    Attributes:
        up: ``(out_features, rank)`` -- peft's ``lora_B``, kohya's ``lora_up``. With ``down`` set to
            ``None`` it is instead the full delta of the weight (a LoRA file's ``diff``), of the
            weight's shape.
        down: ``(rank, in_features)`` -- ``lora_A``/``lora_down``; for a conv layer
            ``(rank, in_channels, *kernel)`` (or flattened to 2-D); ``None`` for a full delta.
        scale: the factor applied to the product (user strength x alpha / rank).
        name: where it came from (LoRA file and key), for messages.
    """

    up: torch.Tensor
    down: torch.Tensor | None = None
    scale: float = 1.0
    name: str = ""
    uid: int = field(default_factory=lambda: next(_ADAPTER_IDS), repr=False)
    _cast: dict[tuple[torch.device, torch.dtype], tuple[Any, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        """The adapter's rank (rows of ``down``; the full width for a full delta)."""
        return int(self.down.shape[0]) if self.down is not None else int(self.up.shape[-1])

    def tensors(self, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(down, up) on ``device`` in ``dtype`` (cached: moved and cast once per device/dtype)."""
        return _cast_cached(self._cast, (self.down, self.up), device, dtype)  # type: ignore[return-value]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * up @ (down @ x)`` for a linear layer, in ``x.dtype`` (peft's order of ops)."""
        down, up = self.tensors(x.device, x.dtype)
        if down is None:
            return F.linear(x, up) * self.scale
        return F.linear(F.linear(x, down), up) * self.scale

    def conv_delta(self, layer: _QuantConvNd, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term for a conv layer: ``down`` as a conv with the layer's geometry
        (stride, padding, dilation, padding mode), then ``up`` as a 1x1 conv."""
        w_shape = tuple(layer.weight.shape)
        down, up = self.tensors(x.device, x.dtype)
        if down is None:
            return layer._torch_conv_forward(x, up.reshape(w_shape), None) * self.scale
        down = down.reshape(down.shape[0], *w_shape[1:])
        h = layer._torch_conv_forward(x, down, None)
        n = x.dim() - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        return conv(h, up.reshape(up.shape[0], -1, *([1] * n))) * self.scale

    def delta_weight(self, shape: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The adapter as a dense weight delta of ``shape``: ``scale * up @ down`` (in float32)."""
        up = self.up.detach().to(torch.float32)
        if self.down is None:
            d = up.reshape(shape) * self.scale
        else:
            d = (up.reshape(up.shape[0], -1) @ self.down.detach().to(torch.float32).flatten(1))
            d = d.reshape(shape) * self.scale
        return d.to(dtype)


@dataclass(eq=False)
class KronAdapter:
    """A Kronecker-product adapter (LyCORIS's LoKr) beside a layer's weight: the layer adds
    ``scale * kron(w1, w2) @ x`` to its output, without ever forming ``kron(w1, w2)``.

    ``kron(w1, w2)`` with ``w1`` of shape ``(a, b)`` and ``w2`` of ``(c, d)`` is the
    ``(a*c, b*d)`` matrix whose block ``(i, j)`` is ``w1[i, j] * w2``. Applied to ``x`` (its last
    axis viewed as ``(b, d)``) that is ``w1 @ (x_bd @ w2.T)``: two small products, so an adapter
    that would be a full-size matrix (LoKr deltas have full rank) costs the memory of its two
    factors and ``b*d*c + a*b*c`` multiply-adds per token. Conv layers form the delta weight
    (``kron`` of ``w1`` with ``w2`` flattened past its first axis, reshaped to the weight's shape).

    Attributes:
        w1: ``(a, b)``.
        w2: ``(c, d)``; ``a*c`` is the layer's output width, ``b*d`` its input width (times the
            kernel's elements for a conv).
        scale: the factor applied to the product (user strength x alpha / rank).
        name: where it came from (LoRA file and key), for messages.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    scale: float = 1.0
    name: str = ""
    uid: int = field(default_factory=lambda: next(_ADAPTER_IDS), repr=False)
    _cast: dict[tuple[torch.device, torch.dtype], tuple[Any, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    def tensors(self, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2) on ``device`` in ``dtype`` (cached per device/dtype)."""
        return _cast_cached(self._cast, (self.w1, self.w2), device, dtype)  # type: ignore[return-value]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * kron(w1, w2) @ x`` for a linear layer, in ``x.dtype``."""
        w1, w2 = self.tensors(x.device, x.dtype)
        z = x.unflatten(-1, (w1.shape[1], w2.shape[1])) @ w2.t()  # (..., b, c)
        return torch.matmul(w1, z).flatten(-2) * self.scale  # (..., a, c) -> (..., a*c)

    def conv_delta(self, layer: _QuantConvNd, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term for a conv layer: its delta weight as a conv of the layer's
        geometry."""
        w1, w2 = self.tensors(x.device, x.dtype)
        w = torch.kron(w1, w2.flatten(1)).reshape(layer.weight.shape)
        return layer._torch_conv_forward(x, w, None) * self.scale

    def delta_weight(self, shape: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The adapter as a dense weight delta of ``shape``: ``scale * kron(w1, w2)``
        (in float32)."""
        w1 = self.w1.detach().to(torch.float32)
        w2 = self.w2.detach().to(torch.float32).flatten(1)
        return (torch.kron(w1, w2).reshape(shape) * self.scale).to(dtype)


#: What a layer's ``lora_adapters`` list holds.
Adapter = LoraAdapter | KronAdapter


def lora_adapters(module: nn.Module) -> list[Adapter]:
    """The (mutable) list of adapters of a quant-aware linear or conv layer (created if absent).

    A per-instance list: appending a :class:`LoraAdapter` (or :class:`KronAdapter`) makes the
    layer add its term in every ``forward``; removing it restores the layer's exact output.
    """
    from .ops import QuantLinear, _QuantConvNd

    if not isinstance(module, (QuantLinear, _QuantConvNd)):
        raise TypeError(f"LoRA adapters go on quant-aware Linear/Conv layers, not "
                        f"{type(module).__name__}")
    found = module.__dict__.get("lora_adapters")
    if found is None:
        found = module.__dict__["lora_adapters"] = []
    return found


def set_lora_fusion(flag: bool | None) -> None:
    """Force the fused CUDA LoRA path on/off (``None``: follow ``GGUFVIDEO_LORA_FUSED``, on by
    default)."""
    global _lora_fusion
    _lora_fusion = flag


def _fusion_on() -> bool:
    if _lora_fusion is not None:
        return _lora_fusion
    return os.environ.get("GGUFVIDEO_LORA_FUSED", "1").strip().lower() not in ("0", "false", "no")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                adapters: list[Adapter], *, owner: nn.Module | None = None) -> torch.Tensor:
    """``quant_linear(x, weight, bias) + sum(a.scale * a.up @ (a.down @ x))``, in ``x.dtype``.

    Reference path (CPU, small batches, training): the base product exactly as without adapters,
    then each adapter's two small products added in peft's order (so an fp32 model with these
    adapters gives the same bits as the fp32 model with peft's). Fast path (CUDA, a quantized
    weight taking the decode + GEMM path, inference): the base product exactly as without
    adapters (same kernel, same bits), then one GEMM gives ``h = down @ x`` for all adapters of
    the layer at once (packed into one ``down``/``up`` pair, so three LoRAs cost one of their
    summed rank) and one Triton kernel adds ``(scale * up) @ h`` into the output in place,
    reading and writing it once (:func:`ggufvideo.kernels.lora_up_add`). Adapters that are not
    low-rank pairs (full deltas, :class:`KronAdapter`) add their own term on either path.
    """
    if owner is not None and isinstance(weight, GGMLTensor):
        # Low-rank pairs go through the fused path; the others (full deltas, Kronecker
        # products) add their own terms after it.
        pairs = [a for a in adapters
                 if isinstance(a, LoraAdapter) and a.down is not None and a.down.dim() == 2]
        if pairs and _fusable(x, weight, pairs):
            y = _fused_lora_linear(x, weight, bias, pairs, owner)
            for a in adapters:
                if not any(a is p for p in pairs):
                    y = y + a.delta(x)
            return y
    from . import ops

    y = ops.quant_linear(x, weight, bias)
    for a in adapters:
        y = y + a.delta(x)
    return y


def _fusable(x: torch.Tensor, weight: GGMLTensor, adapters: list[LoraAdapter]) -> bool:
    """Whether the low-rank pairs ``adapters`` take the fused CUDA path for ``x``."""
    if not (weight.dim() == 2 and _fusion_on()
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(
            a.up.requires_grad or a.down.requires_grad for a in adapters)):  # type: ignore[union-attr]
        return False
    from . import ops

    kernels = ops._gpu_kernels(weight)
    if kernels is None:
        return False
    # Few rows: the reference path's small products cost no more than the packed ones.
    return x.numel() // max(1, x.shape[-1]) > kernels.FUSED_MAX_M


def _lora_pack(adapters: list[LoraAdapter], dtype: torch.dtype, device: torch.device,
               owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """All adapters of a layer as one ``down`` (R, K) and one ``(scale * up).T`` (R, N)."""
    key = (dtype, device, tuple((a.uid, a.scale) for a in adapters))
    cached = owner.__dict__.get("_lora_pack")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    down = torch.cat([a.down.to(device=device, dtype=dtype) for a in adapters], 0)  # type: ignore[union-attr]
    up_t = torch.cat([a.up.to(device=device, dtype=torch.float32) * a.scale for a in adapters], 1)
    pack = (down.contiguous(), up_t.t().to(dtype).contiguous())
    owner.__dict__["_lora_pack"] = (key, *pack)
    return pack


def _fused_lora_linear(x: torch.Tensor, weight: GGMLTensor, bias: torch.Tensor | None,
                       adapters: list[LoraAdapter], owner: nn.Module) -> torch.Tensor:
    down, up_t = _lora_pack(adapters, x.dtype, x.device, owner)
    n, r = int(weight.shape[0]), int(down.shape[0])
    from . import ops

    b = None if bias is None else ops.dequantize_weight(bias, x.dtype)
    from . import kernels

    # Measured on an H200 (README, LoRA): appending ``down``'s rows to the decoded weight so one
    # GEMM also yields ``h`` cost more than re-reading ``x`` in a GEMM of its own (four Wan-14B
    # blocks, rank 32: +9.6% against +5.1%) -- N + r columns slow the base GEMM down.
    out = kernels.linear(x, weight.raw, weight.qtype, n, b)
    h = F.linear(x, down)
    kernels.lora_up_add(out.view(-1, n), h.view(-1, r), up_t)
    return out
