"""DoRA: a LoRA file's magnitudes, turned into :class:`~ggufvideo.ops.DoraAdapter` s.

A DoRA layer stores, beside its adapter (a LoRA pair, or a LyCORIS LoHa/LoKr/diff), a magnitude
``m``; the trained weight is the adapted weight ``W + D`` rescaled to that magnitude,
``m * (W + D) / ||W + D||``. The files differ in where the norm is taken and how they store
``m``:

========================================  ==================================  ================
key                                       shape                               norm per
========================================  ==================================  ================
``.lora_magnitude_vector`` (peft,         ``(out,)``; a conv's                output row
diffusers, SimpleTuner), ``.magnitude``   ``(1, out, 1, ...)``
(ai-toolkit)
``.dora_scale`` (LyCORIS >= 3.2, kohya)   ``(out, 1, ...)``                   output row
``.dora_scale`` (older LyCORIS)           ``(1, in, ...)``                    input feature /
                                                                              channel
========================================  ==================================  ================

(A ``dora_scale`` whose first axis is the layer's output width is per output row, as ComfyUI
decides it.) The norm is that of the base weight plus this adapter's own delta at full strength
(alpha / rank applied, as peft and LyCORIS take it), in float32, without an epsilon: a row whose
adapted weight is zero stays zero. Computing it decodes the layer's weight once, when the LoRA is
applied or baked.

Strength ``s`` blends linearly between the base weight and the trained one, ``W + s * (W'' -
W)``: 0 is off and 1 the trained weight, as for every other adapter (ComfyUI's reading of a DoRA
strength). peft (which puts ``s`` inside the norm and always applies the magnitude) and LyCORIS
(which scales only the magnitude's correction) agree with it at ``s = 1`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import LoraError, _safe
from ..ops import DoraAdapter, KronAdapter, LoraAdapter, dequantize_weight
from ..tensor import GGMLTensor
from .targets import Piece

__all__ = ["dora_axis", "dora_adapter", "check_stackable", "check_plan", "float32_weight",
           "magnitude_key"]


def dora_axis(piece: Piece, weight_shape: tuple[int, ...], source: str) -> int:
    """Which axis the magnitude of ``piece`` (a LoRA piece with one) rescales on a weight of
    ``weight_shape``: 0 (output rows) or 1 (input features / channels).

    Raises:
        LoraError: the weight is not 2-D or more, the magnitude fits neither axis, or it is per
            input feature while the piece covers only some rows of the weight (a part of a fused
            weight: its norm would need the rows the LoRA does not target).
    """
    e = piece.entry
    m = e.magnitude
    assert m is not None
    key = magnitude_key(piece)
    if len(weight_shape) < 2:
        raise LoraError(f"a DoRA magnitude on {_safe(piece.key)} of shape {list(weight_shape)}: "
                        "DoRA rescales the rows of a Linear or Conv weight", path=source,
                        tensor=key)
    out_rows, n = piece.name_rows, m.numel()
    inputs = int(weight_shape[1])
    if e.magnitude_axis == "out":
        if n == out_rows:
            return 0
    elif m.dim() and m.shape[0] == out_rows and n == out_rows:
        return 0
    elif m.dim() >= 2 and m.shape[0] == 1 and m.shape[1] == inputs and n == inputs:
        whole = piece.rows == (0, piece.total_rows) and piece.name_rows == piece.total_rows
        if not whole:
            raise LoraError(f"a DoRA magnitude per input feature {list(m.shape)} on a part (rows "
                            f"{piece.rows[0]}:{piece.rows[1]}) of {_safe(piece.key)} is not "
                            "supported: its norm spans rows the LoRA does not target",
                            path=source, tensor=key)
        return 1
    per = "one per output row" if e.magnitude_axis == "out" else \
        "one per output row, or (1, in) for one per input feature"
    raise LoraError(f"DoRA magnitude of shape {list(m.shape)} does not fit the weight "
                    f"{_safe(piece.key)} of shape {list(weight_shape)} (expected {per}: "
                    f"{out_rows} output rows, {inputs} inputs)", path=source, tensor=key)


def float32_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as float32 values outside autograd (a quantized one decoded exactly, by the
    layers' own decoder :func:`ggufvideo.ops.dequantize_weight`)."""
    if isinstance(weight, GGMLTensor):
        return dequantize_weight(weight, torch.float32)
    return weight.detach().to(torch.float32)


def dora_adapter(piece: Piece, inner: LoraAdapter | KronAdapter, weight: torch.Tensor,
                 source: str) -> DoraAdapter:
    """The DoRA adapter of ``piece`` on ``weight`` (the model's whole tensor, quantized or not):
    ``inner`` is the piece's own adapter (alpha / rank in its scale), whose delta the norms
    include; they are taken in float32 on the weight's device.

    Raises:
        LoraError: the magnitude fits no axis of the weight (see :func:`dora_axis`), or the
            weight is on the meta device.
    """
    shape = tuple(int(d) for d in weight.shape)
    axis = dora_axis(piece, shape, source)
    assert piece.entry.magnitude is not None
    if weight.device.type == "meta":
        raise LoraError(f"{_safe(piece.key)} holds no values yet (a model built on the meta "
                        "device): a DoRA's norms need the weights, so load them first",
                        path=source, tensor=magnitude_key(piece))
    m = piece.entry.magnitude.detach().to(torch.float32).reshape(-1)
    w = float32_weight(weight)
    d = inner.delta_weight(shape, device=w.device)
    start, stop = piece.rows
    if axis == 0:
        lo, hi = piece.lora_rows
        adapted = (w[start:stop] + d[start:stop]).flatten(1)
        norm = torch.linalg.vector_norm(adapted, dim=1)
        part = torch.where(norm > 0, m[lo:hi].to(w.device) / norm, torch.zeros_like(norm))
        ratio = torch.ones(shape[0], dtype=torch.float32)
        ratio[start:stop] = part.cpu()
    else:
        adapted = (w + d).transpose(0, 1).flatten(1)
        norm = torch.linalg.vector_norm(adapted, dim=1)
        ratio = torch.where(norm > 0, m.to(w.device) / norm, torch.zeros_like(norm)).cpu()
    return DoraAdapter(inner=inner, ratio=ratio, axis=axis, rows=piece.rows if axis == 0 else None,
                       name=inner.name)


def magnitude_key(piece: Piece) -> str:
    """The file key of ``piece``'s magnitude (for messages)."""
    keys = piece.entry.keys
    return next((k for k in keys if "magnitude" in k or "dora_scale" in k), keys[0])


def _overlap(a: tuple[int, tuple[int, int] | None], b: tuple[int, tuple[int, int] | None]) -> bool:
    (axis_a, rows_a), (axis_b, rows_b) = a, b
    if axis_a == 1 or axis_b == 1 or rows_a is None or rows_b is None:
        return True
    return rows_a[0] < rows_b[1] and rows_b[0] < rows_a[1]


def _refuse(key: str, earlier: str, source: str, tensor: str) -> LoraError:
    return LoraError(f"{_safe(key)} already carries a DoRA ({_safe(earlier)}) on the same rows; a "
                     "layer takes one DoRA at a time (its norm is taken against the weight "
                     "without the other, so two would be neither what was trained)",
                     path=source, tensor=tensor)


def check_stackable(existing: Sequence[object], new: DoraAdapter, key: str, source: str,
                    tensor: str = "") -> None:
    """Raise unless the DoRA ``new`` can join a layer's adapters ``existing``: DoRAs on one layer
    must cover disjoint output rows (parts of a fused weight)."""
    for a in existing:
        if isinstance(a, DoraAdapter) and _overlap((a.axis, a.rows), (new.axis, new.rows)):
            raise _refuse(key, a.name, source, tensor)


def check_plan(key: str, shape: tuple[int, ...], todo: Sequence[tuple[Sequence[Piece], str]]
               ) -> None:
    """The same rule for LoRAs merged into one tensor together (``convert --lora A --lora B``):
    ``todo`` holds each LoRA's pieces on the tensor ``key`` and its source."""
    seen: list[tuple[tuple[int, tuple[int, int] | None], int, str]] = []
    for i, (pieces, source) in enumerate(todo):
        for p in pieces:
            if p.entry.magnitude is None:
                continue
            axis = dora_axis(p, shape, source)
            span = (axis, p.rows if axis == 0 else None)
            for other, j, where in seen:
                if j != i and _overlap(other, span):
                    raise _refuse(key, where, source, magnitude_key(p))
            seen.append((span, i, source))
