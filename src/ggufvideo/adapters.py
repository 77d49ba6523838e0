"""Adapters beside a quant-aware layer's weight (LoRA, unmerged): what each one adds.

A :class:`LoraAdapter` (or :class:`KronAdapter`, :class:`DoraAdapter`) lives in a layer's
``lora_adapters`` list; :class:`~ggufvideo.ops.QuantLinear` and the quant-aware convs add each
adapter's term to their output (:mod:`ggufvideo.adapted`), so the quantized base weight is never
merged or re-decoded for it (peft's idea: adapters are data beside the base). Reading LoRA files
and attaching adapters to a model is :mod:`ggufvideo.lora`'s job. ``ops`` re-exports the names
here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .ops import _QuantConvNd

__all__ = ["Adapter", "DoraAdapter", "KronAdapter", "LoraAdapter", "adapter_nbytes",
           "lora_adapters", "release_device_copies"]


# -- low-rank adapters beside a layer's weight (LoRA, unmerged) -----------------------------------
_ADAPTER_IDS = itertools.count()


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
                     dtype: torch.dtype = torch.float32, device: torch.device | None = None
                     ) -> torch.Tensor:
        """The adapter as a dense weight delta of ``shape``: ``scale * up @ down`` (in float32,
        on ``device``: where its factors are unless given)."""
        up = self.up.detach().to(device=device, dtype=torch.float32)
        if self.down is None:
            d = up.reshape(shape) * self.scale
        else:
            down = self.down.detach().to(device=device, dtype=torch.float32)
            d = (up.reshape(up.shape[0], -1) @ down.flatten(1))
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
                     dtype: torch.dtype = torch.float32, device: torch.device | None = None
                     ) -> torch.Tensor:
        """The adapter as a dense weight delta of ``shape``: ``scale * kron(w1, w2)``
        (in float32, on ``device``: where its factors are unless given)."""
        w1 = self.w1.detach().to(device=device, dtype=torch.float32)
        w2 = self.w2.detach().to(device=device, dtype=torch.float32).flatten(1)
        return (torch.kron(w1, w2).reshape(shape) * self.scale).to(dtype)


def along(v: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """The vector ``v`` in ``like``'s dtype, shaped to broadcast along ``like``'s axis ``dim``
    (per output feature, per channel...)."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return v.to(like.dtype).reshape(shape)


@dataclass(eq=False)
class DoraAdapter:
    """A DoRA adapter (weight-decomposed LoRA) beside a layer's weight, kept unmerged.

    DoRA rescales the adapted weight ``W + D`` (``D``: the ``inner`` adapter's delta, alpha /
    rank applied) to a learned magnitude: ``W'' = g * (W + D)`` with ``g = m / ||W + D||``, one
    factor per output row (``axis`` 0: peft, LyCORIS >= 3.2) or per input feature / channel
    (``axis`` 1: older LyCORIS files). At strength ``s`` the layer computes
    ``W + s * (W'' - W)`` -- off at 0, the trained weight at 1, linear in between like every
    other adapter here -- without forming it::

        axis 0:  y = c * (W x) + b + s * g * (D x)      with c = 1 + s * (g - 1)
        axis 1:  y = W (c * x) + b + s * D (g * x)

    The bias is not rescaled (as in peft and LyCORIS). ``g`` is computed once, when the adapter
    is made (:mod:`ggufvideo.lora.dora`), and does not follow later changes of the weight or of
    ``inner`` (an adapter for inference; peft's DoRA recomputes the norm in every forward, for
    training); rows a DoRA does not cover (a part of a fused weight) have ``g = 1`` there and a
    zero delta.

    Attributes:
        inner: the low-rank pair (or LoHa pair, LoKr, full delta) whose delta is ``D``; its own
            ``scale`` is the file's alpha / rank.
        ratio: ``g`` (float32, one per output row or input feature).
        axis: 0 (output rows) or 1 (input features / channels).
        scale: the strength ``s``.
        rows: the output rows it covers (axis 0), for telling where two DoRAs would overlap.
        name: where it came from (LoRA file and key), for messages.
    """

    inner: LoraAdapter | KronAdapter
    ratio: torch.Tensor
    axis: int = 0
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    name: str = ""
    uid: int = field(default_factory=lambda: next(_ADAPTER_IDS), repr=False)
    _cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor]] = field(
        default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        """The inner adapter's rank."""
        inner = self.inner
        return inner.rank if isinstance(inner, LoraAdapter) else int(inner.w1.shape[0])

    def _g(self, device: torch.device) -> torch.Tensor:
        return _cast_cached(self._cast, (self.ratio,), device, torch.float32)[0]  # type: ignore[return-value]

    def factor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``c = 1 + s * (g - 1)``, the base product's factor (rounded once to ``dtype``)."""
        return (1.0 + self.scale * (self._g(device) - 1.0)).to(dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term for a linear layer: ``s * g * (D x)`` or ``s * D (g * x)``."""
        g = self._g(x.device)
        if self.axis == 1:
            return self.inner.delta(x * along(g, x, -1)) * self.scale
        d = self.inner.delta(x)
        return d * along(g, d, -1) * self.scale

    def conv_delta(self, layer: _QuantConvNd, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term for a conv layer (``g`` along the channel axis)."""
        g = self._g(x.device)
        if self.axis == 1:
            return self.inner.conv_delta(layer, x * along(g, x, 1)) * self.scale
        d = self.inner.conv_delta(layer, x)
        return d * along(g, d, 1) * self.scale

    def merged_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_s - W`` for the float32 weight ``weight``: ``(c - 1) * W + s * g * D`` (axis 0;
        along the input axis for axis 1), in float32."""
        w = weight.detach().to(torch.float32)
        g = along(self._g(w.device), w, self.axis)
        d = self.inner.delta_weight(tuple(w.shape), device=w.device)
        return self.scale * ((g - 1.0) * w + g * d)


#: What a layer's ``lora_adapters`` list holds.
Adapter = LoraAdapter | KronAdapter | DoraAdapter


def adapter_nbytes(a: Adapter, dtype: torch.dtype) -> int:
    """Device bytes an adapter's copies take once it has run in ``dtype`` (its factors cast
    to it; a DoRA's ``g`` stays float32). Weight streaming counts them as resident."""
    if isinstance(a, DoraAdapter):
        return adapter_nbytes(a.inner, dtype) + a.ratio.numel() * 4
    parts = (a.up, a.down) if isinstance(a, LoraAdapter) else (a.w1, a.w2)
    return sum(t.numel() for t in parts if t is not None) * dtype.itemsize


def release_device_copies(model: nn.Module) -> None:
    """Drop the device copies the adapters on ``model``'s layers made when they ran (cast caches,
    a layer's packed pairs): weight streaming calls it when a model leaves the device, so they do
    not stay there beside the next model's weights. They are made again on the next run."""
    for m in model.modules():
        for a in m.__dict__.get("lora_adapters") or ():
            a._cast.clear()
            if isinstance(a, DoraAdapter):
                a.inner._cast.clear()
        m.__dict__.pop("_lora_pack", None)


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
