"""IQ4_NL and IQ4_XS encoders, byte-identical to ggml's ``ggml_quantize_chunk``.

Both types store 4-bit indices into ggml's non-linear codebook ``kvalues_iq4nl`` and share one
scale search per 32-element group (ggml's ``quantize_row_iq4_nl_impl`` with ``ntry = 7``): a first
scale from the group's largest magnitude, then 15 more candidate scales, each scored by the
weighted least-squares fit of the nearest codebook values; the best fit (first wins ties) is kept.
IQ4_NL stores that scale as fp16. IQ4_XS quantizes the 8 group scales of a 256-element super-block
to 6 bits against one fp16 super-scale and re-picks every index for the quantized scale.

Importance of element ``j``: ``imatrix[j] * sqrt(sigma2 + x[j]**2)`` with ``sigma2`` twice the mean
square of the (super-)block, or ``x[j]**2`` without an importance matrix.

Nearest codebook value: ggml binary-searches the table and breaks the final choice with the
float32 comparison ``x - lo < hi - x``. That comparison is monotone in ``x`` on each interval, so
it is equivalent to comparing ``x`` with one exact float32 threshold per interval; the thresholds
are found once from the table, and counting the thresholds above ``x`` reproduces ggml's index for
every float, including its choice on exact ties and for NaN (index 15).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL

from ._quantize_common import (
    GROUP_MAX_EPS,
    device_step,
    div,
    first_abs_max,
    nearest_int,
    pack_nibbles,
    recip_or_zero,
    seq_sum,
    sqrt,
    to_fp16,
)
from .base import get_quant_type

__all__ = ["KVALUES", "best_index", "best_value", "encode_iq4_nl", "quantize_iq4_xs",
           "subblock_scales"]

#: ggml's ``kvalues_iq4nl`` codebook (ascending), taken from gguf-py.
KVALUES: tuple[int, ...] = tuple(int(v) for v in _GGUF_IQ4_NL.kvalues)

# Candidate inverse scales after the first: (itry + kvalues[0]) / max for itry = -7..7.
_TRY_NUMERATORS = [float(t + KVALUES[0]) for t in range(-7, 8)]

# Groups per internal step of the scale search (on CPU; see device_step): 16 candidates x 32
# elements per group, so ~4 MB per float32 temporary.
_SEARCH_GROUPS = 2048


def _upper_wins(v: np.float32, lo: np.float32, hi: np.float32) -> bool:
    """ggml's tie-break inside ``[lo, hi)``: upper unless ``v - lo < hi - v`` (in float32)."""
    return not (np.float32(v - lo) < np.float32(hi - v))


def _thresholds(values: tuple[int, ...]) -> np.ndarray:
    """For each pair of neighbours, the smallest float32 for which ggml picks the upper one."""
    out = []
    for a, b in zip(values[:-1], values[1:]):
        lo, hi = np.float32(a), np.float32(b)
        t = np.float32((a + b) / 2)
        while not _upper_wins(t, lo, hi):
            t = np.nextafter(t, np.float32(np.inf))
        while _upper_wins(np.nextafter(t, np.float32(-np.inf)), lo, hi):
            t = np.nextafter(t, np.float32(-np.inf))
        assert lo < t <= hi
        out.append(t)
    return np.array(out, dtype=np.float32)


_THRESHOLDS = _thresholds(KVALUES)
_THRESHOLD_LIST = [float(t) for t in _THRESHOLDS]  # exact: float32 values as Python floats
_STEPS = [float(b - a) for a, b in zip(KVALUES[:-1], KVALUES[1:])]


def _count_thresholds(v: torch.Tensor, steps: list[float], top: float,
                      work: torch.Tensor | None = None) -> torch.Tensor:
    """``top - sum(steps[k] for each threshold k above v)`` in float32.

    Counting from the top with ``v < t`` also gives ggml's answer for NaN (every comparison
    false: the top index). A handful of streaming compare-and-subtract passes into float32 buffers
    is several times faster in torch than ``bucketize``, table gathers or bool masks. ``work``:
    optional ``(2, >= v.numel())`` float32 scratch; the result is then a view into its row 0.
    """
    if work is None:
        work = torch.empty((2, v.numel()), dtype=torch.float32, device=v.device)
    acc = work[0, :v.numel()].view(v.shape).fill_(top)
    below = work[1, :v.numel()].view(v.shape)
    for t, step in zip(_THRESHOLD_LIST, steps):
        torch.lt(v, t, out=below)
        acc.sub_(below, alpha=step)
    return acc


def best_index(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, v)`` for every element of ``v`` (uint8)."""
    return _count_thresholds(v, [1.0] * len(_THRESHOLD_LIST), 15.0).to(torch.uint8)


def best_value(v: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """``KVALUES[best_index(v)]`` as float32 (exact small integers), without a gather."""
    return _count_thresholds(v, _STEPS, float(KVALUES[-1]), work)


def subblock_scales(xt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The fitted scale of each 32-element group, as ggml's search finds it.

    Args:
        xt: position-major values ``(32, m)`` float32.
        wt: their importance weights, same shape.

    Returns:
        ``(m,)`` float32; ``+0.0`` for groups whose largest magnitude is below ``GROUP_MAX_EPS``.
    """
    step = device_step(_SEARCH_GROUPS, xt.device)
    # Scratch reused by every step: fresh large tensors cost page faults.
    work = torch.empty((3, 32 * 16 * min(step, max(xt.shape[1], 1))), dtype=torch.float32,
                       device=xt.device)
    parts = [_search(xt[:, s:s + step], wt[:, s:s + step], work)
             for s in range(0, max(xt.shape[1], 1), step)]
    return torch.cat(parts)


def _search(xt: torch.Tensor, wt: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    xt, wt = xt.contiguous(), wt.contiguous()
    amax, mx = first_abs_max(xt, dim=0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)  # zero groups keep scale 0; avoid dividing by 0
    d0 = div(-mx, float(KVALUES[0]))
    tries = torch.tensor(_TRY_NUMERATORS, dtype=torch.float32, device=xt.device)
    inv = torch.cat([div(1.0, d0)[None, :], div(tries[:, None], mx[None, :])], dim=0)  # (16, m)

    # Layout (position, candidate, group): groups innermost keeps every op a long vector loop.
    x3 = xt[:, None, :]
    m = xt.shape[1]
    scaled = torch.mul(inv[None], x3, out=work[2, :32 * 16 * m].view(32, 16, m))
    q = best_value(scaled, work)
    wq = torch.mul(wt[:, None, :], q, out=scaled)
    sumq2 = seq_sum(q.mul_(wq))                                         # (16, m)
    sumqx = seq_sum(wq.mul_(x3))

    d = torch.where(sumq2[0] > 0, div(sumqx[0], sumq2[0]), 0.0)
    best = d * sumqx[0]
    for k in range(1, inv.shape[0]):
        qx, q2 = sumqx[k], sumq2[k]
        better = (q2 > 0) & (qx * qx > best * q2)
        d = torch.where(better, div(qx, q2), d)
        best = torch.where(better, d * qx, best)
    return torch.where(zero, 0.0, d)


def _weights(xt: torch.Tensor, imatrix_t: torch.Tensor | None) -> torch.Tensor:
    """Position-major importance of each element of a (super-)block of ``xt.shape[0]`` values."""
    sq = xt * xt
    if imatrix_t is None:
        return sq
    sigma2 = seq_sum(sq) * (2.0 / xt.shape[0])  # a power of two: exact, like ggml's 2.f/size
    return imatrix_t * sqrt(sigma2 + sq)


def encode_iq4_nl(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """IQ4_NL blocks from ``(n, 32)`` float32 ``x`` and optional same-shape importance."""
    xt = x.t().contiguous()
    wt = _weights(xt, None if imatrix is None else imatrix.t().contiguous())
    d = subblock_scales(xt, wt)
    codes = best_index(x * recip_or_zero(d)[:, None])
    return get_quant_type(T.IQ4_NL).layout.pack(d=to_fp16(d[:, None]), qs=pack_nibbles(codes))


# Super-blocks per step of quantize_iq4_xs (8 groups each).
_XS_BLOCKS = _SEARCH_GROUPS // 8


def quantize_iq4_xs(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """IQ4_XS blocks as ggml writes them.

    Args:
        x: ``(n_blocks, 256)`` float values.
        imatrix: ``None`` or per-element importance, broadcastable to ``x``.

    Returns:
        ``(n_blocks, 136)`` uint8.
    """
    x = x.detach().to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != 256:
        raise ValueError(f"expected blocks of shape (n_blocks, 256), got {tuple(x.shape)}")
    if imatrix is not None:
        imatrix = imatrix.detach().to(device=x.device, dtype=torch.float32).expand_as(x)
    parts = []
    step = device_step(_XS_BLOCKS, x.device)
    for s in range(0, max(x.shape[0], 1), step):
        im = None if imatrix is None else imatrix[s:s + step]
        parts.append(_encode_xs(x[s:s + step], im))
    return torch.cat(parts)


def _encode_xs(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[0]
    xt = x.t().contiguous()                                             # (256, n)
    wt = _weights(xt, None if imatrix is None else imatrix.t().contiguous())
    # Groups ordered block-major (block b, group g -> column 8b+g), positions first.
    groups_x = x.reshape(n * 8, 32).t()
    groups_w = wt.t().reshape(n * 8, 32).t()
    scales = subblock_scales(groups_x, groups_w).reshape(n, 8)

    # The group scale of largest magnitude, first one on ties (strict > from 0, like ggml).
    amax = torch.zeros(n, dtype=torch.float32, device=x.device)
    smax = torch.zeros(n, dtype=torch.float32, device=x.device)
    for g in range(8):
        a = scales[:, g].abs()
        up = a > amax
        amax = torch.where(up, a, amax)
        smax = torch.where(up, scales[:, g], smax)

    d = div(-smax, 32.0)
    ls = nearest_int(recip_or_zero(d)[:, None] * scales).clamp_(-32, 31)  # (n, 8)
    dl = d[:, None] * ls.to(torch.float32)
    codes = best_index(x.reshape(n, 8, 32) * recip_or_zero(dl)[:, :, None]).reshape(n, 256)

    ls = ls + 32
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    shifts = 2 * torch.arange(8, dtype=torch.int32, device=x.device)
    scales_h = ((ls >> 4) << shifts).sum(dim=1, keepdim=True)
    return get_quant_type(T.IQ4_XS).layout.pack(d=to_fp16(d[:, None]), scales_h=scales_h,
                                                scales_l=scales_l, qs=pack_nibbles(codes))
