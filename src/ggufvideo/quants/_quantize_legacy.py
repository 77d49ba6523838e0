"""Encoders for the 32-element block types, byte-identical to ggml's ``ggml_quantize_chunk``.

Without an importance matrix ggml uses its simple "reference" encoders: one scale from the block's
extreme value(s), then a truncating conversion of every element. With one, Q4_0/Q5_0 search 19
candidate scales for the best weighted least-squares fit (``make_qx_quants``) and Q4_1/Q5_1 search
37 candidate (scale, min) pairs (``make_qkx3_quants``); the importance of element ``j`` is
``imatrix[j] * sqrt(sigma2 + x[j]**2)`` where ``sigma2`` is the mean square of the whole row.
Q8_0 ignores the importance matrix. IQ4_NL lives with IQ4_XS in :mod:`._quantize_iq4`.

Every candidate is evaluated for all blocks at once; the sums and the choice between candidates
follow ggml's order exactly (see :mod:`._quantize_common` for the float32 idioms).

Row boundaries: the weighted encoders need ``sigma2`` over a whole row. The registry's
``quantize_blocks`` passes ``blocks_per_row`` through (:func:`ggufvideo.quants.quantize` gives the
row length); by default each block is taken as a row of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ._quantize_common import (
    GROUP_MAX_EPS,
    SMALL_ROUND_LIMIT,
    device_step,
    div,
    first_abs_max,
    first_extreme,
    high_bit_bytes,
    nearest_int,
    pack_nibbles,
    recip_or_zero,
    round_small_,
    seq_sum,
    sqrt,
    to_fp16,
)
from .base import get_quant_type

__all__ = [
    "quantize_iq4_nl",
    "quantize_q4_0",
    "quantize_q4_1",
    "quantize_q5_0",
    "quantize_q5_1",
    "quantize_q8_0",
]

# Blocks per internal step of the candidate searches (on CPU; see device_step). make_qx_quants
# holds 19 candidates per element (~5 MB per float32 temporary at 2048 blocks); make_qkx3_quants
# scores a few candidates per round but runs several rounds, so it gets larger steps to keep
# the per-round overhead down.
_SEARCH_BLOCKS = 2048
_QKX3_SEARCH_BLOCKS = 8192


def _truncate_codes(v: torch.Tensor, cap: float) -> torch.Tensor:
    """ggml's ``MIN(cap, (int)v)`` store of a reference encoder's scaled value ``v`` (int32).

    ``v`` is ``x/d + offset`` with ``d`` taken from the block's own extremes, so every finite ``v``
    lies in ``[0, cap + 1.5)`` (a subnormal ``d`` keeps at least 21 significant bits until ``1/d``
    overflows) and the C conversion never wraps. A non-finite ``v`` (``1/d`` overflowed: inf, or
    ``0 * inf`` = NaN) is converted by x86 to ``INT_MIN``, whose low byte -- the stored code --
    is 0.
    """
    return v.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(max=cap).to(torch.int32)


def _pack(qtype: T, **fields: torch.Tensor) -> torch.Tensor:
    """Assemble blocks through the type's declared layout; float fields (``d``, ``m``) are
    rounded to fp16 as ggml does."""
    fields = {k: to_fp16(v) if v.is_floating_point() else v for k, v in fields.items()}
    return get_quant_type(qtype).layout.pack(**fields)


# ---------------------------------------------------------------------------------------------
# Reference encoders (no importance matrix)
# ---------------------------------------------------------------------------------------------

def _ref_symmetric(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0 reference: ``d = max / -nmax``, ``q = min(2nmax-1, (int8)(x/d + nmax + 0.5))``."""
    _, mx = first_abs_max(x, dim=1)
    d = div(mx, float(-nmax))
    inv = recip_or_zero(d)
    return d, _truncate_codes(x * inv[:, None] + (nmax + 0.5), 2 * nmax - 1)


def _ref_affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1 reference: ``d = (max - min) / levels``, ``q = (int)((x - min)/d + 0.5)``.

    (ggml clamps Q4_1's code to 15 and not Q5_1's; both stay within ``levels`` anyway.)"""
    mn = first_extreme(x, dim=1, largest=False)
    mx = first_extreme(x, dim=1, largest=True)
    d = div(mx - mn, float(levels))
    inv = recip_or_zero(d)
    return d, mn, _truncate_codes((x - mn[:, None]) * inv[:, None] + 0.5, levels)


# ---------------------------------------------------------------------------------------------
# Weighted searches (importance matrix given)
# ---------------------------------------------------------------------------------------------

def _row_sigma2(x: torch.Tensor, blocks_per_row: int) -> torch.Tensor:
    """Per block, the mean square of its row: ``sum(x*x)/n_per_row`` summed left to right.

    numpy's ``add.accumulate`` is a strictly sequential float32 loop (unlike ``sum``/``cumsum``,
    which use pairwise or wider accumulation), and rows can be tens of thousands of elements long.
    """
    n_rows = x.shape[0] // blocks_per_row
    n_per_row = blocks_per_row * x.shape[1]
    sq = (x * x).reshape(n_rows, n_per_row).cpu().numpy()
    total = np.add.accumulate(sq, axis=1, dtype=np.float32)[:, -1]
    sigma2 = total / np.float32(n_per_row)
    out = torch.from_numpy(np.ascontiguousarray(sigma2)).to(x.device)
    return out.repeat_interleave(blocks_per_row)


def _importance(x: torch.Tensor, imatrix: torch.Tensor, blocks_per_row: int) -> torch.Tensor:
    """``qw[j] * sqrtf(sigma2 + x[j]*x[j])``, ggml's weight for the legacy types."""
    sigma2 = _row_sigma2(x, blocks_per_row)
    return imatrix * sqrt(sigma2[:, None] + x * x)


# Candidate numerators of ``make_qx_quants``: the first pass uses nmax, then nmax + 0.1*is for
# is = -9..9 (is = 0 skipped), each a float32 expression in C.
def _qx_numerators(nmax: int) -> list[float]:
    tenth = np.float32(0.1)
    steps = [i for i in range(-9, 10) if i != 0]
    return [float(nmax)] + [float(np.float32(nmax) + tenth * np.float32(i)) for i in steps]


def _qx_search(x: torch.Tensor, w: torch.Tensor, nmax: int,
               work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(32, nmax, x, L, rmse_type=1, w)`` for every block.

    Returns the scale ``(n,)`` and the codes ``L + nmax`` ``(n, 32)`` in ``[0, 2*nmax)``.
    ``work``: optional ``(2, >= 32*19*n)`` float32 scratch reused across calls (fresh large
    tensors cost page faults).
    """
    n = x.shape[0]
    amax, mx = first_abs_max(x, dim=1)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)  # those blocks are all-zero codes; avoid 0/0 noise
    nums = torch.tensor(_qx_numerators(nmax), dtype=torch.float32, device=x.device)
    iscale = div(-nums[:, None], mx[None, :])                           # (19, n)

    # Layout (position, candidate, block): blocks innermost keeps every op a long vector loop.
    xt, wt = x.t().contiguous()[:, None, :], w.t().contiguous()[:, None, :]  # (32, 1, n)
    # |iscale * x| <= ~nmax + 0.9 since |x| <= |max|: always in round_small_'s range.
    k = nums.numel()
    if work is None:
        work = torch.empty((2, 32 * k * n), dtype=torch.float32, device=x.device)
    lf = torch.mul(iscale[None], xt, out=work[0, :32 * k * n].view(32, k, n))
    round_small_(lf).clamp_(-nmax, nmax - 1)                            # (32, 19, n)
    tmp = torch.mul(wt * xt, lf, out=work[1, :32 * k * n].view(32, k, n))
    sumlx = seq_sum(tmp)                                                # (19, n)
    suml2 = seq_sum(torch.mul(wt, lf, out=tmp).mul_(lf))

    scale = torch.where(suml2[0] != 0, div(sumlx[0], suml2[0]), 0.0)
    best = scale * sumlx[0]
    pick = torch.zeros(n, dtype=torch.int64, device=x.device)
    for k in range(1, nums.numel()):
        lx, l2 = sumlx[k], suml2[k]
        better = (l2 > 0) & (lx * lx > best * l2)
        scale = torch.where(better, div(lx, l2), scale)
        best = torch.where(better, scale * lx, best)
        pick = torch.where(better, k, pick)

    codes = torch.gather(lf, 1, pick[None, None, :].expand(32, 1, n)).squeeze(1).t()
    codes = codes.to(torch.int32) + nmax
    scale = torch.where(zero, 0.0, scale)
    codes = torch.where(zero[:, None], 0, codes)
    return scale, codes


# Candidate numerators of ``make_qkx3_quants(..., rmin=-0.9, rdelta=0.05, nstep=36)``:
# ``rmin + rdelta*is + nmax`` in float32, is = 0..36.
def _qkx3_numerators(nmax: int) -> list[float]:
    rmin, rdelta = np.float32(-0.9), np.float32(0.05)
    return [float((rmin + rdelta * np.float32(i)) + np.float32(nmax)) for i in range(37)]


def _qkx3_candidates(xt: torch.Tensor, wt: torch.Tensor, sum_w: torch.Tensor, sum_x: torch.Tensor,
                     mx: torch.Tensor, mn: torch.Tensor, nums: torch.Tensor, nmax: int,
                     work: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Evaluate candidate scales ``nums / (max - min)`` of ``make_qkx3_quants``.

    ``nums`` is ``(k, n)``: per block, the numerators of the candidates to try, from its current
    ``min`` ``mn``. Returns ``(det, scale, min, mad, codes)``, each ``(k, n)`` except ``codes``,
    ``(32, k, n)``, a view into ``work`` (2 rows of at least ``32*k*n`` floats, reused across
    rounds: fresh large tensors cost page faults). Every sum runs over the 32 positions in order,
    as in ggml; blocks are the innermost dim so that every op is a long vector loop.
    """
    k, n = nums.shape
    lv = work[0, :32 * k * n].view(32, k, n)
    buf = work[1, :32 * k * n].view(32, k, n)
    iscales = div(nums, (mx - mn)[None, :])                             # (k, n)
    x3 = xt[:, None, :]
    w3 = wt[:, None, :]
    xm = xt - mn                                                        # (32, n)
    torch.mul(iscales[None], xm[:, None, :], out=lv)
    # nearest_int's bit trick equals the cheap float rounding unless a product can reach 2**21;
    # with ggml's own candidates that takes a degenerate min, so check it per call.
    bound = iscales.abs() * xm.abs().amax(dim=0)[None, :]
    if bool((bound < SMALL_ROUND_LIMIT).all()):
        round_small_(lv).clamp_(0, nmax)
    else:
        lv.copy_(nearest_int(lv).clamp_(0, nmax))
    sum_l = seq_sum(torch.mul(w3, lv, out=buf))                         # (k, n)
    sum_xl = seq_sum(buf.mul_(x3))                                      # (w*l)*x
    sum_l2 = seq_sum(torch.mul(w3, lv, out=buf).mul_(lv))               # (w*l)*l
    sw, sx = sum_w[None, :], sum_x[None, :]
    det = sw * sum_l2 - sum_l * sum_l
    this_scale = div(sw * sum_xl - sx * sum_l, det)
    this_min = div(sum_l2 * sx - sum_l * sum_xl, det)
    positive = this_min > 0
    this_scale = torch.where(positive, div(sum_xl, sum_l2), this_scale)
    this_min = torch.where(positive, 0.0, this_min)
    diff = torch.mul(lv, this_scale[None], out=buf).add_(this_min[None]).sub_(x3)
    mad = seq_sum(diff.mul_(diff).mul_(w3))                             # w * diff**2
    return det, this_scale, this_min, mad, lv


# Candidates evaluated per block and round of the make_qkx3_quants search (see below).
_QKX3_WINDOW = 6


def _qkx3_search(x: torch.Tensor, w: torch.Tensor,
                 nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx3_quants(32, nmax, x, w, ..., -0.9f, 0.05f, 36, false)`` for every block.

    Returns ``(scale, min, codes)``: the block decodes as ``scale * code + min`` (``min <= 0``).

    ggml walks its 37 candidates in order, and accepting one also replaces the ``min`` that every
    later candidate is computed from, so candidates cannot all be scored up front. The search runs
    in rounds instead: each unfinished block scores its next few candidates with its current
    ``min``, keeps the first accepted one (if any) and resumes right after it in the next round
    (the candidates it scored past that point used a stale ``min`` and are scored again).
    """
    n = x.shape[0]
    dev = x.device
    mn = first_extreme(x, dim=1, largest=False)
    mx = first_extreme(x, dim=1, largest=True)
    mn = torch.where(mn > 0, 0.0, mn)
    flat = mx <= mn  # constant block: ggml returns scale 0, codes 0 and this min

    xt, wt = x.t().contiguous(), w.t().contiguous()                     # (32, n)
    sum_w = seq_sum(wt[1:], start=wt[0])
    sum_x = seq_sum(wt[1:] * xt[1:], start=wt[0] * xt[0])

    iscale = div(float(nmax), mx - mn)
    scale = div(1.0, iscale)
    codes = nearest_int(iscale * (xt - mn)).clamp_(0, nmax).to(torch.float32)  # (32, n)
    diff = (scale * codes + mn) - xt
    best_mad = seq_sum(wt * (diff * diff))

    nums = torch.tensor(_qkx3_numerators(nmax), dtype=torch.float32, device=dev)
    n_cand = nums.numel()
    window = torch.arange(_QKX3_WINDOW, device=dev)
    pos = torch.zeros(n, dtype=torch.int64, device=dev)  # next candidate to score
    active = (~flat).nonzero().squeeze(1)
    work = torch.empty((2, 32 * _QKX3_WINDOW * max(n, 1)), dtype=torch.float32, device=dev)
    while active.numel():
        def take(t: torch.Tensor) -> torch.Tensor:  # the active blocks (index_select is fast)
            return t.index_select(t.dim() - 1, active)

        k = window[:, None] + take(pos)[None, :]                        # (W, a)
        valid = k < n_cand
        det, t_scale, t_min, mad, lv = _qkx3_candidates(
            take(xt), take(wt), take(sum_w), take(sum_x), take(mx), take(mn),
            nums[k.clamp(max=n_cand - 1)], nmax, work)
        ok = valid & (det > 0) & (mad < take(best_mad)[None, :])
        # First acceptance per block: a few selects beat an argmax across the short dim 0.
        first_ok = torch.full_like(k[0], _QKX3_WINDOW)
        for i in range(_QKX3_WINDOW - 1, -1, -1):
            first_ok = torch.where(ok[i], i, first_ok)
        hit = first_ok < _QKX3_WINDOW
        j = first_ok.clamp(max=_QKX3_WINDOW - 1)[None, :]               # (1, a)
        hits = hit.nonzero().squeeze(1)
        rows = active.index_select(0, hits)

        def chosen(t: torch.Tensor) -> torch.Tensor:  # (W, a) -> the accepted value per hit
            return t.gather(0, j).squeeze(0).index_select(0, hits)

        scale.index_copy_(0, rows, chosen(t_scale))
        mn.index_copy_(0, rows, chosen(t_min))
        best_mad.index_copy_(0, rows, chosen(mad))
        picked = torch.gather(lv, 1, j[None].expand(32, 1, -1)).squeeze(1)
        codes.index_copy_(1, rows, picked.index_select(1, hits))
        new_pos = torch.where(hit, k.gather(0, j).squeeze(0) + 1, k[0] + _QKX3_WINDOW)
        pos[active] = new_pos
        active = active[new_pos < n_cand]

    scale = torch.where(flat, 0.0, scale)
    codes = torch.where(flat[None, :], 0.0, codes)
    return scale, mn, codes.t().to(torch.int32)


def _weighted(x: torch.Tensor, imatrix: torch.Tensor, blocks_per_row: int, step_blocks: int,
              search: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
              ) -> tuple[torch.Tensor, ...]:
    """Run ``search(x, weights)`` over bounded slices of blocks and concatenate the results."""
    w = _importance(x, imatrix, blocks_per_row)
    step = device_step(step_blocks, x.device)
    parts = [search(x[s:s + step], w[s:s + step]) for s in range(0, max(x.shape[0], 1), step)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _qx_weighted(x: torch.Tensor, imatrix: torch.Tensor, blocks_per_row: int,
                 nmax: int) -> tuple[torch.Tensor, ...]:
    """:func:`_qx_search` over bounded steps of blocks, sharing one scratch workspace."""
    n_work = min(device_step(_SEARCH_BLOCKS, x.device), max(x.shape[0], 1))
    work = torch.empty((2, 32 * 19 * n_work), dtype=torch.float32, device=x.device)
    return _weighted(x, imatrix, blocks_per_row, _SEARCH_BLOCKS,
                     lambda xb, wb: _qx_search(xb, wb, nmax, work))


def _prepare(x: torch.Tensor, imatrix: torch.Tensor | None,
             blocks_per_row: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = x.detach().to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != 32:
        raise ValueError(f"expected blocks of shape (n_blocks, 32), got {tuple(x.shape)}")
    if x.shape[0] % blocks_per_row:
        raise ValueError(f"{x.shape[0]} blocks is not a whole number of "
                         f"{blocks_per_row}-block rows")
    if imatrix is not None:
        imatrix = imatrix.detach().to(device=x.device, dtype=torch.float32)
        imatrix = imatrix.expand_as(x).contiguous()
    return x, imatrix


# ---------------------------------------------------------------------------------------------
# Public encoders: (n_blocks, 32) float32 -> (n_blocks, type_size) uint8
# ---------------------------------------------------------------------------------------------

def quantize_q4_0(x: torch.Tensor, imatrix: torch.Tensor | None, *,
                  blocks_per_row: int = 1) -> torch.Tensor:
    """Q4_0 blocks as ggml writes them (``imatrix``: per-element importance, or ``None``)."""
    x, imatrix = _prepare(x, imatrix, blocks_per_row)
    if imatrix is None:
        d, q = _ref_symmetric(x, 8)
    else:
        d, q = _qx_weighted(x, imatrix, blocks_per_row, 8)
    return _pack(T.Q4_0, d=d[:, None], qs=pack_nibbles(q))


def quantize_q5_0(x: torch.Tensor, imatrix: torch.Tensor | None, *,
                  blocks_per_row: int = 1) -> torch.Tensor:
    """Q5_0 blocks as ggml writes them."""
    x, imatrix = _prepare(x, imatrix, blocks_per_row)
    if imatrix is None:
        d, q = _ref_symmetric(x, 16)
    else:
        d, q = _qx_weighted(x, imatrix, blocks_per_row, 16)
    return _pack(T.Q5_0, d=d[:, None], qh=high_bit_bytes(q), qs=pack_nibbles(q & 0x0F))


def quantize_q4_1(x: torch.Tensor, imatrix: torch.Tensor | None, *,
                  blocks_per_row: int = 1) -> torch.Tensor:
    """Q4_1 blocks as ggml writes them."""
    x, imatrix = _prepare(x, imatrix, blocks_per_row)
    if imatrix is None:
        d, m, q = _ref_affine(x, 15)
    else:
        d, m, q = _weighted(x, imatrix, blocks_per_row, _QKX3_SEARCH_BLOCKS,
                            lambda xb, wb: _qkx3_search(xb, wb, 15))
    return _pack(T.Q4_1, d=d[:, None], m=m[:, None], qs=pack_nibbles(q))


def quantize_q5_1(x: torch.Tensor, imatrix: torch.Tensor | None, *,
                  blocks_per_row: int = 1) -> torch.Tensor:
    """Q5_1 blocks as ggml writes them."""
    x, imatrix = _prepare(x, imatrix, blocks_per_row)
    if imatrix is None:
        d, m, q = _ref_affine(x, 31)
    else:
        d, m, q = _weighted(x, imatrix, blocks_per_row, _QKX3_SEARCH_BLOCKS,
                            lambda xb, wb: _qkx3_search(xb, wb, 31))
    return _pack(T.Q5_1, d=d[:, None], m=m[:, None], qh=high_bit_bytes(q),
                 qs=pack_nibbles(q & 0x0F))


_JUST_BELOW_HALF = torch.tensor(float(np.nextafter(np.float32(0.5), np.float32(0))))


def quantize_q8_0(x: torch.Tensor, imatrix: torch.Tensor | None, *,
                  blocks_per_row: int = 1) -> torch.Tensor:
    """Q8_0 blocks as ggml writes them; ggml ignores the importance matrix for Q8_0."""
    x, _ = _prepare(x, None, blocks_per_row)
    amax = x.abs().amax(dim=1)
    d = div(amax, 127.0)
    v = x * recip_or_zero(d)[:, None]
    # roundf (half away from zero): adding the float just below 0.5 with v's sign and truncating
    # is exact for every float32 (adding 0.5 itself would round 0.49999997 up to 1).
    r = v.add_(torch.copysign(_JUST_BELOW_HALF.to(v.device), v)).trunc_()
    q = r.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # as in _truncate_codes; |r| <= 127
    return _pack(T.Q8_0, d=d[:, None], qs=q.to(torch.int8))


def quantize_iq4_nl(x: torch.Tensor, imatrix: torch.Tensor | None, *,
                    blocks_per_row: int = 1) -> torch.Tensor:
    """IQ4_NL blocks as ggml writes them (the search is shared with IQ4_XS)."""
    from ._quantize_iq4 import encode_iq4_nl

    x, imatrix = _prepare(x, imatrix, blocks_per_row)
    return encode_iq4_nl(x, imatrix)

