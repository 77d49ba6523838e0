"""K-quant Q3_K scale search: ggml's ``make_q3_quants`` with its coordinate descent run in rounds.

Apart from :mod:`._kquant_search` because it is its own algorithm: ggml's descent changes one
position at a time, and the round-based form here (every column's best candidate per round,
vectorized; the tests check it against the step-by-step :func:`._kquant_search._descend`) is what
makes Q3_K without an importance matrix affordable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._kquant_search import _F32, _NINT_SAFE, _round_clamp, _Scratch
from ._quantize_common import (
    GROUP_MAX_EPS,
    SMALL_ROUND_LIMIT,
    div,
    first_abs_max,
    nearest_int,
    seq_sum,
)

#: ggml's ``make_q3_quants`` runs at most this many passes of its coordinate descent.
_Q3_PASSES = 5


def _q3_candidates(X: torch.Tensor, W: torch.Tensor, WX: torch.Tensor, L: torch.Tensor,
                   slx: torch.Tensor, sl2: torch.Tensor, slx_all: torch.Tensor,
                   sl2_all: torch.Tensor, rank: torch.Tensor, lo: int, hi: int,
                   buf: Callable[[str], torch.Tensor],
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of ``make_q3_quants``' descent at *every* position of each column at once, all
    from the column's current sums ``slx_all``/``sl2_all`` (``(C,)``) and codes ``L``
    (``(P, C)``), with the float32 operations, in the order, that ggml's step at that position
    performs from that state.

    ``slx``/``sl2`` ``(P, C)`` hold ``wx*L`` and ``(w*L)*L`` on entry and are overwritten with
    the sums after each position's change. ``rank`` ``(P, C)`` orders the positions in which the
    steps would run from here; ``buf(name)`` gives a ``(P, C)`` work buffer. Returns ``(key,
    new, slx, sl2)``: ``key`` ``(C,)`` the smallest ``rank`` of a position whose step would take
    its new code (``+64`` where none would), the new codes, and the sums. Comparisons write 0/1
    float32 (several times faster than bool results on CPU) and are combined by products
    (exact on 0/1).
    """
    v, tmp, flag, take = buf("q3_new"), buf("q3_tmp"), buf("q3_flag"), buf("q3_take")
    # The sums without position i's term.
    torch.sub(slx_all, slx, out=slx)
    torch.sub(sl2_all, sl2, out=sl2)
    torch.mul(X, sl2, out=v).div_(slx)  # x[i]*sl2/slx, left to right
    # ggml only looks further where slx > 0; v is garbage (maybe inf/NaN) elsewhere.
    torch.gt(slx, 0, out=take)
    # nearest_int is round-half-even below 2**21 (NaN fails the test); only positions that count
    # need it. Where some don't, the bit trick (exact for any input) rounds the whole step.
    torch.abs(v, out=flag)
    torch.lt(flag, SMALL_ROUND_LIMIT, out=flag).sub_(take)
    if float(flag.amin()) < 0:
        v.copy_(nearest_int(v).clamp_(lo, hi))
    else:
        v.clamp_(lo, hi).round_()  # clamping to integer bounds commutes with rounding
    new = v
    # The sums with the new code, slx + (w*x)*new and sl2 + (w*new)*new, in place (q3 tests
    # sl2 > 0 after the change; the sums without the term are not needed again).
    slx.add_(torch.mul(WX, new, out=tmp))
    sl2.add_(torch.mul(W, new, out=tmp).mul_(new))
    # Strict improvement: (slx*slx)*suml2 > (sumlx*sumlx)*sl2.
    torch.mul(slx, slx, out=tmp).mul_(sl2_all)
    torch.gt(tmp, torch.mul(sl2, slx_all * slx_all, out=flag), out=tmp)
    take.mul_(tmp)
    # new != L as 0/1: codes are small integers, so |new - L| clamped to 1 (three fast
    # float ops; a float-valued ne is far slower on CPU).
    take.mul_(torch.sub(new, L, out=tmp).abs_().clamp_(max=1.0))
    take.mul_(torch.gt(sl2, 0, out=tmp))
    # key = rank where taken, rank + 64 elsewhere.
    key = take.mul_(-64.0).add_(64.0).add_(rank).amin(0)
    return key, new, slx, sl2


def _descend_q3(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, G: torch.Tensor,
                lx: torch.Tensor, l2: torch.Tensor, nmax: int, scratch: _Scratch) -> None:
    """``make_q3_quants``' coordinate descent (:func:`_descend` with ``qp_rules=False``), run as
    rounds over columns instead of steps over positions, in place on ``G`` ``(P+2, R)``: the
    codes ``L`` in rows ``:P``, then ``sumlx`` and ``suml2``. ``lx``/``l2`` are ``wx*L`` and
    ``(w*L)*L`` of the initial codes (overwritten).

    Why rounds give ggml's result: a step that takes no new code leaves the column's state
    (codes and sums) as it was, so from a given state the step at every position can be
    evaluated at once (:func:`_q3_candidates`), and the steps ggml runs until the next change are
    exactly those up to the first position, in visiting order, whose change is taken. A round
    applies that one change per column (or finishes the column) and the next round starts from
    the new state. From position ``ptr`` of pass ``p`` the visiting order is ``ptr..P-1`` in pass
    ``p``, then ``0..ptr-1`` in pass ``p+1`` (from ``ptr`` on, pass ``p+1`` would repeat this
    round's no-change steps and end the descent); a column ends when its next change would fall
    in pass ``_Q3_PASSES`` or there is none. Most columns change nothing in their first pass, so
    after the first (full-width) round few remain, and about as many rounds run as the busiest
    column makes changes, each a few dozen ops, where the step-by-step loop needed two dozen ops
    per position and pass.
    """
    P, R = x.shape
    dev = x.device
    lo, hi = -nmax, nmax - 1
    L, sums = G[:P], G[P:]
    pos = torch.arange(P, dtype=_F32, device=dev).unsqueeze(1)
    key, new, slx_n, sl2_n = _q3_candidates(
        x, w, wx, L, lx, l2, sums[0], sums[1], pos, lo, hi,
        lambda name: scratch.get(name, (P, R), dev))
    keep = (key < P).nonzero().squeeze(1)  # round 1 starts at position 0 of pass 0
    if keep.numel() == 0:
        return
    width = R
    # Per remaining column, one float32 tensor compacted by one gather per round: rows
    # x, w, wx, L (P each), slx, sl2 (as G: rows 3P..4P+1), ptr (the next position), pass, and
    # the column's index (int32 bits: gathers copy them unchanged, whatever the chunk size).
    # All later-round buffers come from the scratch (sized by the first such round, which is
    # the largest): fresh multi-MiB tensors would be new pages to fault in every round.
    F = 4 * P + 5
    st = scratch.get("q3_st0", (F, keep.numel()), dev)
    # Column gathers and scatters as gather/scatter_ with an expanded index: several times
    # faster on CPU than index_select/index_copy_ along dim 1.
    for row, t in enumerate((x, w, wx, G)):
        torch.gather(t, 1, keep.expand(t.shape[0], -1), out=st[row * P:row * P + t.shape[0]])
    st[4 * P + 3] = 0.0
    st[4 * P + 4].view(torch.int32).copy_(keep)
    ptr, npass = st[4 * P + 2], st[4 * P + 3]
    k = key.index_select(0, keep)
    cand = None  # later rounds: (slx, sl2, new) stacked, (3, P, n), for one gather
    spare = "q3_st0"  # the scratch buffer st is in (compaction alternates between two)
    while True:
        # Apply each kept column's change: position j = k mod P, in the next pass where k >= P.
        j = torch.fmod(k, float(P))
        npass.add_(k >= P)
        jl = j.long()
        flat = jl * width + keep
        if cand is None:
            got = torch.stack([t.view(-1).index_select(0, flat) for t in (slx_n, sl2_n, new)])
        else:
            got = cand.view(3, -1).index_select(1, flat)
        st[4 * P:4 * P + 2].copy_(got[:2])
        st[3 * P:4 * P].scatter_(0, jl.unsqueeze(0), got[2:])
        torch.add(j, 1.0, out=ptr)
        # The next round, from the new state.
        n = width = st.shape[1]
        X, W, WX, Lc = (st[i * P:(i + 1) * P] for i in range(4))
        slx_all, sl2_all = st[4 * P], st[4 * P + 1]
        rank = torch.lt(pos, ptr, out=scratch.get("q3_rank", (P, n), dev))
        rank.mul_(float(P)).add_(pos)  # positions before ptr come in the next pass
        cand = scratch.get("q3_cand", (3, P, n), dev)
        torch.mul(WX, Lc, out=cand[0])
        torch.mul(W, Lc, out=cand[1]).mul_(Lc)
        key = _q3_candidates(
            X, W, WX, Lc, cand[0], cand[1], slx_all, sl2_all, rank, lo, hi,
            lambda name: cand[2] if name == "q3_new" else scratch.get(name, (P, n), dev))[0]
        # Continue where a change comes in this pass, or in the next one while passes remain.
        limit = torch.lt(npass, _Q3_PASSES - 1).to(_F32).mul_(float(P)).add_(float(P))
        cont = key < limit
        done = (~cont).nonzero().squeeze(1)
        if done.numel():
            cols = st[4 * P + 4].view(torch.int32).index_select(0, done).long()
            G.scatter_(1, cols.expand(P + 2, -1),
                       torch.gather(st[3 * P:4 * P + 2], 1, done.expand(P + 2, -1)))
        keep = cont.nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        spare = "q3_st1" if spare == "q3_st0" else "q3_st0"
        st = torch.gather(st, 1, keep.expand(F, -1),
                          out=scratch.get(spare, (F, keep.numel()), dev))
        ptr, npass = st[4 * P + 2], st[4 * P + 3]
        k = key.index_select(0, keep)


def _make_q3(x: torch.Tensor, nmax: int,
             scratch: _Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants`` with ``do_rmse``: a first guess ``-nmax/max`` then up to five
    passes of coordinate descent, element by element in order, each change accepted only if it
    strictly improves ``sumlx^2/suml2`` (weights ``x*x``). Columns of ``(P, R)``; returns
    ``(scale (R,), L (P, R) float32 in [0, 2*nmax-1])``. Work buffers come from ``scratch``
    when given.
    """
    scratch = scratch or _Scratch()
    P, R = x.shape
    dev = x.device
    # first_abs_max scans NaN-holding tensors in order; a column max (which propagates NaN)
    # tells whether any is there for a fraction of the cost of testing every element.
    has_nan = bool(torch.isnan(x.amax(0)).any())
    amax, mx = first_abs_max(x, 0, nan_never_wins=has_nan)
    zero = ~(amax >= GROUP_MAX_EPS)
    iscale = torch.where(zero, 0.0, div(float(-nmax), mx))
    G = scratch.get("q3_G", (P + 2, R), dev)  # L, then its sums (see _descend_q3)
    L = torch.mul(x, iscale, out=G[:P])
    lo_v, hi_v = torch.aminmax(L)  # NaN fails both tests
    if bool((hi_v <= _NINT_SAFE) & (lo_v >= -_NINT_SAFE)):
        L.clamp_(-nmax, nmax - 1).round_()
    else:
        L.copy_(_round_clamp(L, -nmax, nmax - 1, exact=True))
    w = torch.mul(x, x, out=scratch.get("q3_w", (P, R), dev))
    wx = torch.mul(w, x, out=scratch.get("q3_wx", (P, R), dev))
    lx = torch.mul(wx, L, out=scratch.get("q3_lx", (P, R), dev))
    l2 = torch.mul(w, L, out=scratch.get("q3_l2", (P, R), dev)).mul_(L)
    seq_sum(lx, out=G[P])
    seq_sum(l2, out=G[P + 1])
    _descend_q3(x, w, wx, G, lx, l2, nmax, scratch)
    sumlx, suml2 = G[P], G[P + 1]
    scale = torch.where(suml2 > 0, div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), L.add_(nmax).mul_((~zero).to(_F32))
