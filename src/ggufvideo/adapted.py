"""A quant-aware layer's forward with its adapters (LoRA, unmerged): reference, DoRA, fused CUDA.

:class:`~ggufvideo.ops.QuantLinear` calls :func:`lora_linear` and the quant-aware convs
:func:`lora_conv` when their ``lora_adapters`` list is not empty: the base product exactly as
without adapters, then each adapter's term (:mod:`ggufvideo.adapters`). On CUDA the low-rank pairs
of a layer are packed and added by one Triton kernel.

This module sits beside :mod:`ggufvideo.ops` and reaches its hooks (``quant_linear``,
``dequantize_weight``, the GPU kernels) through the module at call time, so it imports nothing
from it at load time (``ops`` re-exports the names here).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, DoraAdapter, LoraAdapter, along
from .tensor import GGMLTensor

if TYPE_CHECKING:
    from .ops import _QuantConvNd

__all__ = ["lora_conv", "lora_linear", "set_lora_fusion"]

_lora_fusion: bool | None = None  # None: follow GGUFVIDEO_LORA_FUSED (default on)


def _dora_factors(adapters: list[Adapter], device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``c - 1`` on the input side and on the output side of the base product, for the layer's
    DoRA adapters (``None``: none on that side), in ``dtype``. Several DoRAs on one layer cover
    disjoint output rows (checked when they are applied), so their factors multiply without
    interacting. Kept as ``c - 1`` because ``c`` is near 1: rounded to bfloat16 itself, a
    magnitude's change of a few tenths of a percent would be lost, where ``y + y * (c - 1)``
    keeps it."""
    c_in: torch.Tensor | None = None
    c_out: torch.Tensor | None = None
    for a in adapters:
        if isinstance(a, DoraAdapter):
            c = a.factor(device, torch.float32)
            if a.axis == 1:
                c_in = c if c_in is None else c_in * c
            else:
                c_out = c if c_out is None else c_out * c
    return ((None if c_in is None else (c_in - 1.0).to(dtype)),
            (None if c_out is None else (c_out - 1.0).to(dtype)))


def _rescaled(t: torch.Tensor, c1: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``t * c`` along ``dim`` given ``c1 = c - 1``: ``t + t * c1``."""
    return t if c1 is None else t + t * along(c1, t, dim)


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
    low-rank pairs (full deltas, :class:`KronAdapter`) add their own term on either path. A
    :class:`DoraAdapter` takes the reference path, its factor applied to the base product before
    the bias is added.
    """
    if any(isinstance(a, DoraAdapter) for a in adapters):
        adapters = _live(adapters)
        if any(isinstance(a, DoraAdapter) for a in adapters):
            return _dora_linear(x, weight, bias, adapters)
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


def _live(adapters: list[Adapter]) -> list[Adapter]:
    """``adapters`` less the DoRAs at strength 0 (they change nothing: leaving them out keeps the
    layer's output bit for bit what it is without them)."""
    return [a for a in adapters if not (isinstance(a, DoraAdapter) and a.scale == 0)]


def _dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 adapters: list[Adapter]) -> torch.Tensor:
    from . import ops

    c_in, c_out = _dora_factors(adapters, x.device, x.dtype)
    xb = _rescaled(x, c_in, -1)
    if c_out is None:
        y = ops.quant_linear(xb, weight, bias)
    else:
        y = _rescaled(ops.quant_linear(xb, weight, None), c_out, -1)
        if bias is not None:
            y = y + ops.dequantize_weight(bias, y.dtype)
    for a in adapters:
        y = y + a.delta(x)
    return y


def lora_conv(layer: _QuantConvNd, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, adapters: list[Adapter]) -> torch.Tensor:
    """A conv layer's output with its adapters (``weight``/``bias`` decoded): the base conv, then
    each adapter's term; with a DoRA among them its factors go on the base conv before the bias
    is added."""
    adapters = _live(adapters)
    if not any(isinstance(a, DoraAdapter) for a in adapters):
        y = layer._torch_conv_forward(x, weight, bias)
        for a in adapters:
            y = y + a.conv_delta(layer, x)
        return y
    c_in, c_out = _dora_factors(adapters, x.device, x.dtype)
    xb = _rescaled(x, c_in, 1)
    y = layer._torch_conv_forward(xb, weight, None)
    y = _rescaled(y, c_out, 1)
    if bias is not None:
        y = y + along(bias, y, 1)
    for a in adapters:
        y = y + a.conv_delta(layer, x)
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
