"""What a resolved LoRA piece becomes on a tensor: an adapter beside a layer's weight, or a dense
float32 delta (for small tensors replaced wholesale, bake-in and ``fuse_lora``).

A :class:`~ggufvideo.lora.targets.Piece` says which rows of a LoRA entry land on which rows of a
model tensor; :func:`adapter_for` turns it into a :class:`~ggufvideo.ops.LoraAdapter`,
:class:`~ggufvideo.ops.KronAdapter` or (with a magnitude) :class:`~ggufvideo.ops.DoraAdapter`,
checking that it fits; :func:`dense_delta` sums the pieces on one tensor as a dense delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import LoraError, _safe
from ..ops import Adapter, DoraAdapter, KronAdapter, LoraAdapter
from .dora import dora_adapter, dora_axis, float32_weight
from .lycoris import loha_pair, loha_products_agree, loha_weight, lokr_factors, pair_is_smaller
from .targets import Piece, Resolution

__all__ = ["adapter_for", "check_piece", "check_fits", "dense_delta", "needs_weight"]


def _rows_of(t: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    return t[rows[0]:rows[1]]


def _padded(part: torch.Tensor, piece: Piece) -> torch.Tensor:
    """``part`` (the piece's rows) placed at its rows of the model tensor, zeros elsewhere."""
    start, stop = piece.rows
    if start == 0 and stop == piece.total_rows:
        return part
    full = part.new_zeros((piece.total_rows, *part.shape[1:]))
    full[start:stop] = part
    return full


def adapter_for(piece: Piece, weight_shape: tuple[int, ...], source: str,
                weight: torch.Tensor | None = None) -> Adapter:
    """The adapter a LoRA piece puts on a weight of ``weight_shape`` (scale: alpha / rank).

    A LoRA pair stays a pair; a LoHa becomes one too (rank ``r1 * r2``) while that is smaller
    than the weight, else its dense delta; a LoKr becomes a :class:`KronAdapter` (its factors,
    never the full product) unless the piece is a part of the rows that its Kronecker blocks do
    not line up with, then the dense delta of those rows; a ``diff`` is its own dense delta. A
    piece with a DoRA magnitude wraps that in a :class:`~ggufvideo.ops.DoraAdapter`, whose norms
    need the model's ``weight`` itself (:mod:`ggufvideo.lora.dora`).
    """
    inner = _inner_adapter(piece, weight_shape, source)
    if piece.entry.magnitude is None:
        return inner
    if weight is None:
        raise ValueError(f"{piece.key}: a DoRA piece needs the weight it applies to")
    assert not isinstance(inner, DoraAdapter)
    return dora_adapter(piece, inner, weight, source)


def check_piece(piece: Piece, weight_shape: tuple[int, ...], source: str) -> None:
    """Raise the :class:`~ggufvideo.errors.LoraError` :func:`adapter_for` would, without the
    weight (shapes only)."""
    _inner_adapter(piece, weight_shape, source)
    if piece.entry.magnitude is not None:
        dora_axis(piece, weight_shape, source)


def check_fits(res: Resolution, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise the :class:`~ggufvideo.errors.LoraError` applying ``res`` onto tensors of ``shapes``
    would, from shapes alone (no weight read): every weight piece and bias delta must fit."""
    for key, pieces in res.weights.items():
        for piece in pieces:
            check_piece(piece, shapes[key], source)
    for key, pieces in res.biases.items():
        dense_delta(pieces, shapes[key], source, bias=True)


def _inner_adapter(piece: Piece, weight_shape: tuple[int, ...], source: str
                   ) -> LoraAdapter | KronAdapter:
    e = piece.entry
    where = e.keys[0]
    name = f"{source}: {e.target}"
    rows = piece.name_rows
    inner = 1
    for d in weight_shape[1:]:
        inner *= int(d)

    def misfit(what: str) -> LoraError:
        return LoraError(f"{what} does not fit the weight {_safe(piece.key)} of shape "
                         f"{list(weight_shape)}", path=source, tensor=where)

    def pair(down: torch.Tensor, up: torch.Tensor, what: str) -> LoraAdapter:
        if down[0].numel() != inner or up.shape[0] != rows:
            raise misfit(what)
        up = _padded(_rows_of(up.reshape(up.shape[0], -1), piece.lora_rows), piece)
        return LoraAdapter(up=up, down=down.reshape(down.shape[0], -1), scale=e.scale, name=name)

    def dense(delta: torch.Tensor, what: str, scale: float) -> LoraAdapter:
        if delta.shape[0] != rows or delta[0].numel() != inner:
            raise misfit(what)
        part = _padded(_rows_of(delta, piece.lora_rows), piece).reshape(weight_shape)
        return LoraAdapter(up=part, down=None, scale=scale, name=name)

    f = e.factors
    if e.kind == "lora":
        assert e.down is not None and e.up is not None
        if e.down[0].numel() != inner:
            raise misfit(f"down {list(e.down.shape)}")
        return pair(e.down, e.up, f"up {list(e.up.shape)}")
    if e.kind == "loha":
        what = (f"LoHa hada_w1_a {list(f['hada_w1_a'].shape)} / hada_w1_b "
                f"{list(f['hada_w1_b'].shape)}")
        if not loha_products_agree(f):
            raise misfit(f"{what} (its two products differ in shape)")
        lowrank = loha_pair(f)
        if lowrank is not None and pair_is_smaller(lowrank[0].shape[0], rows, inner):
            return pair(*lowrank, what)
        return dense(loha_weight(f), what, e.scale)
    if e.kind == "lokr":
        w1, w2 = lokr_factors(f)
        what = f"LoKr factors {list(w1.shape)} (x) {list(w2.shape)}"
        if w1.shape[0] * w2.shape[0] != rows or w1.shape[1] * w2.shape[1] != inner:
            raise misfit(what)
        (lo, hi), c = piece.lora_rows, int(w2.shape[0])
        if piece.rows == (0, piece.total_rows) and lo % c == 0 and hi % c == 0:
            # whole Kronecker blocks of rows: the rows of kron(w1, w2) are kron(w1's rows, w2)
            return KronAdapter(w1=w1[lo // c:hi // c], w2=w2, scale=e.scale, name=name)
        return dense(torch.kron(w1, w2), what, e.scale)
    assert e.diff is not None
    return dense(e.diff, f"diff {list(e.diff.shape)}", 1.0)


def dense_delta(pieces: list[Piece], shape: tuple[int, ...], source: str, *,
                bias: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The summed float32 delta the pieces make to a tensor of ``shape`` (scales applied);
    ``weight``, the tensor itself, is needed by DoRA pieces (their delta depends on it)."""
    total = torch.zeros(shape, dtype=torch.float32)
    w32: torch.Tensor | None = None
    for p in pieces:
        if bias:
            e = p.entry
            assert e.diff_b is not None
            part = _rows_of(e.diff_b.reshape(-1) if len(shape) == 1 else e.diff_b, p.lora_rows)
            d = _padded(part.to(torch.float32), p)
            if tuple(d.shape) != tuple(shape):
                raise LoraError(f"diff_b {list(e.diff_b.shape)} does not fit {_safe(p.key)} of "
                                f"shape {list(shape)}", path=source, tensor=e.keys[0])
            total += d
        else:
            if p.entry.magnitude is not None and weight is not None and w32 is None:
                w32 = float32_weight(weight)  # decoded once for all the DoRA pieces
            a = adapter_for(p, shape, source, w32)
            if isinstance(a, DoraAdapter):
                assert w32 is not None
                total += a.merged_delta(w32).cpu()
            else:
                total += a.delta_weight(shape)
    return total


def needs_weight(pieces: list[Piece]) -> bool:
    """Whether :func:`dense_delta` of ``pieces`` needs the weight (a DoRA among them)."""
    return any(p.entry.magnitude is not None for p in pieces)
