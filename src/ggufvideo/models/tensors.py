"""Row splits, concatenations and permutations of tensors, exact for quantized ones (raw blocks are
moved).

A quantized 2-D+ weight stores each row (the last dim) as whole ggml blocks, so the rows of dim 0
are consecutive byte ranges of its raw data: cutting, joining or reordering them is a byte copy of
blocks and the decoded values are the same bits. Tensors whose raw data is not row-aligned (a
>4-D tensor a file stored flattened, or a quantized 1-D tensor cut inside a block) and joins of
parts of different types are decoded to float32 instead -- the exact values, in more memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..tensor import GGMLTensor

__all__ = ["TensorOps", "split_rows", "cat_rows", "swap_halves", "permute_rows"]


def _row_aligned(t: GGMLTensor) -> bool:
    raw = t.raw
    return t.dim() >= 2 and raw.dim() == t.dim() and tuple(raw.shape[:-1]) == tuple(t.shape[:-1])


def _block_rows(t: GGMLTensor) -> tuple[torch.Tensor, int] | None:
    """The raw data as (units, bytes per unit) where a unit is one row of dim 0, if possible."""
    if _row_aligned(t):
        return t.raw.reshape(t.shape[0], -1), 1
    return None


def split_rows(t: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """``t`` cut into consecutive row blocks of dim 0 (views where the data allows)."""
    if isinstance(t, GGMLTensor):
        rows = _block_rows(t)
        if rows is not None:
            raw, _ = rows
            out: list[torch.Tensor] = []
            start = 0
            for n in sizes:
                part = raw[start:start + n].reshape(n, *t.raw.shape[1:])
                out.append(GGMLTensor(part, t.qtype, (n, *t.shape[1:]), t.dtype))
                start += n
            return out
        t = t.dequantize(torch.float32)
    return list(torch.split(t, list(sizes), dim=0))


def cat_rows(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row blocks joined along dim 0; quantized parts of one type stay quantized (bytes joined)."""
    quantized = [t for t in ts if isinstance(t, GGMLTensor)]
    if len(quantized) == len(ts):
        first = quantized[0]
        same = all(t.qtype == first.qtype and _row_aligned(t)
                   and tuple(t.shape[1:]) == tuple(first.shape[1:]) and t.dtype == first.dtype
                   for t in quantized)
        if same:
            raw = torch.cat([t.raw for t in quantized], dim=0)
            n = sum(int(t.shape[0]) for t in quantized)
            return GGMLTensor(raw, first.qtype, (n, *first.shape[1:]), first.dtype)
    plain = [t.dequantize(torch.float32) if isinstance(t, GGMLTensor) else t for t in ts]
    dtype = torch.promote_types(plain[0].dtype, plain[-1].dtype)
    for p in plain:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.cat([p.to(dtype) for p in plain], dim=0)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two row halves of dim 0 in the other order."""
    n = int(t.shape[0])
    if n % 2:
        raise ValueError(f"cannot swap the halves of {n} rows")
    a, b = split_rows(t, [n // 2, n // 2])
    return cat_rows([b, a])


def permute_rows(t: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """``t``'s rows of dim 0 reordered: row ``i`` of the result is row ``order[i]`` of ``t``.

    A quantized tensor's rows are gathered as whole rows of raw blocks (same type, exact)."""
    index = torch.as_tensor(list(order), dtype=torch.long)
    n = int(t.shape[0])
    if index.numel() != n or (n and not torch.equal(torch.sort(index).values, torch.arange(n))):
        raise ValueError(f"row order is not a permutation of {n} rows")
    if isinstance(t, GGMLTensor):
        rows = _block_rows(t)
        if rows is not None:
            raw, _ = rows
            moved = raw.index_select(0, index.to(raw.device)).reshape(t.raw.shape)
            return GGMLTensor(moved, t.qtype, tuple(t.shape), t.dtype)
        t = t.dequantize(torch.float32)
    return t.index_select(0, index.to(t.device))


class TensorOps:
    """:class:`~ggufvideo.models.base.ValueOps` over tensors (plain or :class:`GGMLTensor`)."""

    def rows(self, v: torch.Tensor) -> int:
        return int(v.shape[0])

    def split(self, v: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
        return split_rows(v, sizes)

    def cat(self, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        return cat_rows(vs)

    def swap_halves(self, v: torch.Tensor) -> torch.Tensor:
        return swap_halves(v)

    def permute_rows(self, v: torch.Tensor, order: Callable[[], Sequence[int]]) -> torch.Tensor:
        return permute_rows(v, order())
