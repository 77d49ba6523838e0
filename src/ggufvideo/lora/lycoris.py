"""LyCORIS's LoHa and LoKr adapters: the weight deltas their factors stand for, and the cheapest
exact form of each for a layer.

LoHa (``hada_*``) is the element-wise product of two low-rank matrices::

    delta = (w1_a @ w1_b) * (w2_a @ w2_b)

and LoKr (``lokr_*``) the Kronecker product of two factors, each given whole or as a low-rank
pair::

    delta = kron(w1, w2),  w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b,  likewise w2

With Tucker factors (conv layers: ``hada_t1``/``hada_t2``, ``lokr_t2``) a factor is the core
``t`` (``(rank, rank, *kernel)``) contracted with ``a`` (``(rank, out)``) and ``b``
(``(rank, in)``): ``factor[p, q, ...] = sum_ij a[i, p] * t[i, j, ...] * b[j, q]``.

Neither has to become a full-size matrix on the layer:

* the element-wise product of two rank-``r1`` and rank-``r2`` products is itself a product of
  rank ``r1 * r2`` (row-wise Kronecker products of the ``a`` factors, column-wise of the ``b``
  factors: ``up[i, (p, q)] = w1_a[i, p] * w2_a[i, q]``,
  ``down[(p, q), j] = w1_b[p, j] * w2_b[q, j]``), so a LoHa runs as an ordinary low-rank pair
  while that is smaller than the weight (:func:`loha_pair`);
* a Kronecker product is applied factor by factor
  (:class:`ggufvideo.ops.KronAdapter`; :func:`lokr_factors`).

Everything is computed in float32 from the file's values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["loha_pair", "loha_products_agree", "loha_weight", "lokr_factors", "pair_is_smaller"]

Factors = Mapping[str, torch.Tensor]


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[p, q, ...] = sum_ij a[i, p] * core[i, j, ...] * b[j, q]`` (a factor of shape
    ``(out, in, *kernel)``)."""
    return torch.einsum("ip,ij...,jq->pq...", _f32(a), _f32(core), _f32(b))


def _loha_factor(f: Factors, i: str) -> torch.Tensor:
    """LoHa's ``i``-th product, ``(out, in, *kernel)`` with Tucker, else ``(out, in_flat)``."""
    if f"hada_t{i}" in f:
        return _tucker(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"])
    return _f32(f[f"hada_w{i}_a"]).flatten(1) @ _f32(f[f"hada_w{i}_b"]).flatten(1)


def loha_weight(f: Factors) -> torch.Tensor:
    """The LoHa delta (unscaled, float32), ``(out, in_flat)`` or with Tucker
    ``(out, in, *kernel)``."""
    return _loha_factor(f, "1") * _loha_factor(f, "2")


def loha_products_agree(f: Factors) -> bool:
    """Whether LoHa's two products have one shape (what :func:`loha_pair` and
    :func:`loha_weight` need; the layer's own shape is checked by their callers)."""
    def shape(i: str) -> tuple[int, int]:
        a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
        if f"hada_t{i}" in f:  # Tucker: a (rank, out), b (rank, in)
            return int(a.shape[1]), int(b.shape[1]) * int(f[f"hada_t{i}"][0, 0].numel())
        return int(a.shape[0]), int(b[0].numel())
    return shape("1") == shape("2")


def loha_pair(f: Factors) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LoHa delta as one low-rank pair ``(down (r1*r2, in_flat), up (out, r1*r2))`` with
    ``up @ down == loha_weight(f)`` (float32), or ``None`` for Tucker factors."""
    if "hada_t1" in f:
        return None
    a1, a2 = _f32(f["hada_w1_a"]).flatten(1), _f32(f["hada_w2_a"]).flatten(1)
    b1, b2 = _f32(f["hada_w1_b"]).flatten(1), _f32(f["hada_w2_b"]).flatten(1)
    if a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1]:
        raise ValueError(f"the LoHa products have different shapes: "
                         f"{[a1.shape[0], b1.shape[1]]} and {[a2.shape[0], b2.shape[1]]}")
    up = (a1[:, :, None] * a2[:, None, :]).flatten(1)
    down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)
    return down, up


def pair_is_smaller(rank: int, rows: int, inner: int) -> bool:
    """Whether a rank-``rank`` pair on a ``(rows, inner)`` weight holds (and multiplies) fewer
    numbers than the weight's dense delta: the choice between :func:`loha_pair` and
    :func:`loha_weight` on a layer."""
    return rank * (rows + inner) < rows * inner


def _lokr_factor(f: Factors, i: str) -> torch.Tensor:
    whole = f.get(f"lokr_w{i}")
    if whole is not None:
        return _f32(whole)
    if f"lokr_t{i}" in f:
        return _tucker(f[f"lokr_t{i}"], f[f"lokr_w{i}_a"], f[f"lokr_w{i}_b"])
    return _f32(f[f"lokr_w{i}_a"]).flatten(1) @ _f32(f[f"lokr_w{i}_b"]).flatten(1)


def lokr_factors(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr's two factors (unscaled, float32) as matrices: ``w1`` ``(a, b)`` and ``w2``
    ``(c, d)``, ``w2`` flattened past its first axis (a conv factor's kernel joins its input
    axis, the order in which ``kron(w1, w2)`` reshapes to the weight)."""
    w1, w2 = _lokr_factor(f, "1"), _lokr_factor(f, "2")
    if w1.dim() != 2:
        raise ValueError(f"lokr_w1 must be a matrix, found shape {list(w1.shape)}")
    return w1, w2.flatten(1)
