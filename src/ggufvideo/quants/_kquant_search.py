"""K-quant scale searches: ggml's ``make_qkx2/3_quants``, ``make_qx_quants`` and ``make_qp_quants``
(with and without importance weights), vectorized over groups.

Each search fits the codes and scale(s) of every group (sub-block) of a chunk of blocks at once,
on *position-major* tensors ``(P, groups)`` so that sums run left to right over contiguous slices,
as ggml's C loops do. Only the searches and the float32 idioms they share live here; the Q3_K
search is :mod:`._kquant_search_q3`, the final re-quantization and bit packing
:mod:`._kquant_pack`, the per-type assembly :mod:`._quantize_kquants` (whose docstring lists the
rules that keep every result byte-identical to ggml's).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ._quantize_common import (
    GROUP_MAX_EPS,
    SMALL_ROUND_LIMIT,
    div,
    f32,
    first_abs_max,
    nearest_int,
    round_small_,
    seq_sum,
    seq_sum_slots,
    to_fp16,
)

QK_K = 256
_F32 = torch.float32
_NINT_SAFE = 4194303.0  # |x| up to this: the trick is exact (ggml asserts it, release builds don't)

# ---------------------------------------------------------------------------------------------
# Float32 idioms of ggml's scalar C (the shared ones live in _quantize_common)
# ---------------------------------------------------------------------------------------------
# On CPU the scales' NaNs are x86's own, converted by torch as ggml converts them.
_to_fp16 = partial(to_fp16, native_cpu_nan=True)


def _round_clamp(v: torch.Tensor, lo: int, hi: int, exact: bool | None = None) -> torch.Tensor:
    """``MAX(lo, MIN(hi, nearest_int(v)))`` as float32.

    With ``exact=False`` the caller guarantees ``|v| <= 4194303`` and no NaN: then nearest_int is
    plain round-half-even (``torch.round``), and clamping to integer bounds before rounding gives
    the same result as after; two cheap float ops instead of integer bit work. ``exact=None``
    checks the range itself.
    """
    if exact is None:
        lo_v, hi_v = torch.aminmax(v)  # one pass; NaN propagates and fails both tests
        exact = not bool((hi_v <= _NINT_SAFE) & (lo_v >= -_NINT_SAFE))
    if exact:
        return nearest_int(v).clamp_(lo, hi).to(_F32)
    return v.clamp(lo, hi).round_()


def _keep_where(cond: torch.Tensor, old: Callable[[], torch.Tensor],
                new: torch.Tensor) -> torch.Tensor:
    """``torch.where(cond, old(), new)``, skipped (one reduction instead of a full pass, and
    ``old`` never built) in the usual case where ``cond`` is nowhere set."""
    if not bool(cond.any()):
        return new
    return torch.where(cond, old(), new)


def _running_max_pos(s: torch.Tensor) -> torch.Tensor:
    """``m = 0; if (s > m) m = s;`` over dim 1: the largest positive value, NaN never chosen."""
    return torch.where(s > 0, s, 0.0).amax(1)


class _Scratch:
    """Named float32 work buffers that the chunks of one call share.

    Every chunk needs the same dozen multi-MiB temporaries. Allocated afresh, each comes from
    the system as new pages (the C allocator hands such sizes back after every free), and
    zero-filling those pages on first touch cost about an eighth of the CPU time; reused, only
    the first chunk pays. A buffer is a contiguous view of the first elements of its storage,
    so a smaller last chunk fits in it.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], device: torch.device,
            dtype: torch.dtype = _F32) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape`` (float32 by default), the same
        storage on every call with this ``name``."""
        n = 1
        for dim in shape:
            n *= dim
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.device != device or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


# ---------------------------------------------------------------------------------------------
# Block <-> position-major views
# ---------------------------------------------------------------------------------------------
def _pos_major(x: torch.Tensor, group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``(nb, 256)`` -> ``(group, nb * 256/group)``: column ``b*S + s`` is sub-block ``s`` of
    block ``b``, row ``i`` its element ``i``. Written into ``out`` (that shape) if given."""
    # A plain 2-D transpose of (nb*S, group): torch copies those in cache-sized tiles.
    src = x.reshape(-1, group).t()
    if out is None:
        return src.contiguous()
    return out.copy_(src)


def _block_major(t: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of :func:`_pos_major`: ``(group, nb*S)`` -> ``(nb, 256)``."""
    return t.t().contiguous().view(nb, QK_K)


# ---------------------------------------------------------------------------------------------
# ggml's searches, vectorized over groups (columns)
# ---------------------------------------------------------------------------------------------
def _make_qkx(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
              nstep: int, use_mad: bool, scratch: _Scratch | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` (with weights: the same arithmetic).

    Fits ``x ~ scale*L - the_min`` with ``L`` in ``[0, nmax]`` for each column of the
    position-major ``x``/``w`` ``(P, R)``: a first guess from the range, then ``nstep+1`` trial
    inverse scales ``(rmin + rdelta*is + nmax)/(max - min)``, each followed by a weighted
    least-squares solve for scale and min; a trial whose weighted error (absolute or squared) is
    strictly below the best so far is taken, *and its min is the one later trials start from*, so
    the trials run one after another (each vectorized over all columns).

    Only the winning trial's inverse scale and starting min are remembered; its codes are
    recomputed once at the end (same arithmetic, same result), which keeps the loop to in-place
    work on preallocated buffers. The loop is memory-bound: every full-size pass over ``(P, R)``
    counts, so a trial is four passes for its codes, three for the products, four for the error
    (the last three in place) and in-order sums over four buffers' worth of terms.
    Work buffers come from ``scratch`` when given (``L`` then lives in it too).
    Returns ``(scale (R,), the_min (R,), L (P, R) float32)``.
    """
    scratch = scratch or _Scratch()
    P, R = x.shape
    mx = x.amax(0)
    xmin = x.amin(0)
    mn0 = torch.where(xmin > 0, 0.0, xmin)
    flat = mx == mn0  # ggml returns early: L = 0, scale 0, the_min = -min
    mn = torch.where(flat, mx - 1.0, mn0)  # any harmless range for flat columns (masked at the end)
    codes_buf = scratch.get("qkx_codes", (P, R), x.device)
    # (P, 2, R): w*L and (w*L)*L of position i side by side; once their sums are taken, w*L
    # becomes (w*L)*x in place. Two buffers instead of three keep the trial's working set in
    # cache, and the in-place product moves less memory.
    buf = scratch.get("qkx_terms", (P, 2, R), x.device)
    wl, wl2 = buf.unbind(1)
    sum_w = seq_sum(w[1:], start=w[0])  # ggml starts these two sums from the first term
    wx = torch.mul(w, x, out=codes_buf)
    sum_x = seq_sum(wx[1:], start=wx[0])

    def in_range(iscale: torch.Tensor, start: torch.Tensor) -> bool:
        """Whether every ``iscale*(x - start)`` is below 2**22 in magnitude (and not NaN), where
        the float clamp + round below is exact: ``|x - start| <= max(max - start,
        start - xmin)`` (``|xmin - s|`` is ``|s - xmin|`` exactly, and ``max - s >= xmin - s``).
        Works on any number of leading rows (trials) at once."""
        bound = torch.maximum(mx - start, start - xmin).mul_(iscale).max()
        return float(bound) <= _NINT_SAFE  # NaN or infinity -> False

    def codes(iscale: torch.Tensor, start: torch.Tensor, out: torch.Tensor,
              checked: bool = True) -> torch.Tensor:
        """``MAX(0, MIN(nmax, nearest_int(iscale*(x - start))))`` into ``out``; unchecked, the
        caller vouches that the values are in range."""
        torch.sub(x, start, out=out).mul_(iscale)
        if not checked or in_range(iscale, start):
            # Clamping to [0, nmax] before rounding commutes with rounding for integer bounds,
            # and torch.round is round-half-even like nearest_int in range.
            return out.clamp_(0, nmax).round_()
        return out.copy_(_round_clamp(out, 0, nmax, exact=True))

    def error(L: torch.Tensor, scale: torch.Tensor, the_min: torch.Tensor) -> torch.Tensor:
        """``sum of w * f(scale*L + the_min - x)``, f = fabsf or the square, in order. Works in
        place on ``L`` (the trial's codes are not needed afterwards): in-place passes move less
        memory than ones writing a third buffer."""
        diff = L.mul_(scale).add_(the_min)
        if use_mad:
            diff.sub_(x).abs_()
        else:
            # aten's mse_loss without reduction is (a - x) * (a - x) elementwise, each op one
            # float32 rounding (CPU and CUDA kernels alike): one pass instead of two.
            torch.ops.aten.mse_loss.out(diff, x, 0, out=diff)
        return seq_sum(diff.mul_(w))

    iscale = div(float(nmax), mx - mn)
    L = codes(iscale, mn, codes_buf)
    scale = div(1.0, iscale)
    best0 = error(L, scale, mn)
    dev = x.device
    # Per trial k (0: the first guess, kept when no trial is taken): its solved scale and min,
    # its inverse scale and the min it started from, to pick the last taken trial's at the end.
    # Only the best error and the current min are live state. The per-trial bookkeeping on (R,)
    # vectors is serial and costs per op, so it is kept to a minimum of ops.
    hist = scratch.get("qkx_hist", (nstep + 2, 4, R), dev)
    rows = [h.unbind(0) for h in hist.unbind(0)]  # [k] -> (scale, min, iscale, start)
    rows[0][0].copy_(scale)
    rows[0][2].copy_(iscale)
    rows[0][3].copy_(mn)
    takes = torch.empty((nstep + 1, R), dtype=torch.bool, device=dev)
    nums = [torch.full((), f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + float(nmax)),
                       dtype=_F32, device=dev) for step in range(nstep + 1)]
    # Numerators of the solve, two rows at a time: [sum_w, sum_x] * [sum_xl, sum_l2] minus
    # [sum_x, sum_xl] * sum_l; then (sum_xl/sum_l2, 0) replaces (scale, min) where min > 0.
    coef = torch.stack([sum_w, sum_x])
    cross = torch.stack([sum_x, sum_x])  # row 1 becomes each trial's sum_xl
    alt = torch.zeros((2, R), dtype=_F32, device=dev)

    def trial(k: int, mn: torch.Tensor, best: torch.Tensor,
              checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Trial ``k`` from the current min and best error; records it in ``hist`` and
        ``takes`` and returns the new current min and best error."""
        ts, tm, iscale, start = rows[k]
        start.copy_(mn)
        torch.div(nums[k - 1], mx - mn, out=iscale)
        Lt = codes(iscale, mn, codes_buf, checked)
        torch.mul(w, Lt, out=wl)
        torch.mul(wl, Lt, out=wl2)
        sum_l = seq_sum_slots(buf, (0,))[0]
        wl.mul_(x)  # (w*L)*x
        sums = seq_sum_slots(buf, (0, 1))
        sum_xl, sum_l2 = sums.unbind(0)
        d = sum_w * sum_l2 - sum_l * sum_l
        cross[1] = sum_xl
        solved = torch.mul(coef, sums).sub_(cross.mul(sum_l)).div_(d)
        torch.div(sum_xl, sum_l2, out=alt[0])
        torch.where(solved[1] > 0, alt, solved, out=hist[k, :2])
        err = error(Lt, ts, tm)
        take = torch.logical_and(d > 0, err < best, out=takes[k - 1])
        return torch.where(take, tm, mn), torch.where(take, err, best)

    def search(mn: torch.Tensor, checked: bool) -> torch.Tensor:
        """All trials in order; returns the final current min."""
        best = best0
        for k in range(1, nstep + 2):
            mn, best = trial(k, mn, best, checked)
        return mn

    # The trials run without a range check each; checked afterwards for all at once (from the
    # recorded inverse scales and starting mins), and run again checked if any was out of range.
    mn_start = mn
    mn = search(mn_start, checked=False)
    if not in_range(hist[:, 2], hist[:, 3]):
        mn = search(mn_start, checked=True)
    # The last taken trial (0 for none) of each column.
    steps = torch.arange(1, nstep + 2, dtype=torch.uint8, device=dev).unsqueeze(1)
    last = (takes.view(torch.uint8) * steps).amax(0).long()
    chosen = hist.gather(0, last.view(1, 1, R).expand(1, 4, R)).squeeze(0)
    scale, best_iscale, best_start = chosen[0], chosen[2], chosen[3]

    L = codes(best_iscale, best_start, codes_buf)
    scale = torch.where(flat, 0.0, scale)
    L = L.mul_((~flat).to(_F32))
    return scale, -torch.where(flat, mn0, mn), L


def _make_qx(x: torch.Tensor, w: torch.Tensor | None, nmax: int,
             scratch: _Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants`` with ``rmse_type = 1`` (weights ``w``, or ``x*x`` when None).

    Symmetric fit ``x ~ scale*(L - nmax)``, ``L`` in ``[0, 2*nmax-1]``, over columns of the
    position-major ``(P, R)`` ``x``: the first guess ``-nmax/max`` (max = first element of largest
    magnitude), then 18 trial inverse scales ``-(nmax + 0.1*is)/max``, ``is = -9..9`` without 0; a
    trial replaces the current fit when its weighted ``sumlx^2/suml2`` is strictly larger. Only the
    winning inverse scale is remembered; its codes are recomputed at the end. Work buffers
    come from ``scratch`` when given.
    Returns ``(scale (R,), L (P, R) float32)``.
    """
    scratch = scratch or _Scratch()
    amax, mx = first_abs_max(x, 0, nan_never_wins=True)
    zero = ~(amax >= GROUP_MAX_EPS)  # amax < eps (amax is never NaN here)
    mx = torch.where(zero, 1.0, mx)  # harmless for all-zero columns (masked at the end)
    P, R = x.shape
    if w is None:
        w = torch.mul(x, x, out=scratch.get("qx_w", (P, R), x.device))
    wx = torch.mul(w, x, out=scratch.get("qx_wx", (P, R), x.device))
    # (P, 2, R): a trial's codes, then (w*x)*L made from them in place, next to (w*L)*L, so
    # seq_sum sees contiguous terms; five buffers in all keep the working set in cache.
    buf = scratch.get("qx_terms", (P, 2, R), x.device)
    lt, wl2 = buf.unbind(1)

    # The first guess and the 18 trials' inverse scales do not depend on one another: all at
    # once, and one range check for all. |iscale*x| <= |iscale|*amax: below 2**22 the float
    # clamp + round is exact.
    nums = [float(-nmax)] + [-f32(float(nmax) + f32(f32(0.1) * i)) for i in range(-9, 10) if i]
    iscales = div(torch.tensor(nums, dtype=_F32, device=x.device).unsqueeze(1), mx)
    in_range = bool((iscales.abs() * amax <= _NINT_SAFE).all())

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        torch.mul(x, iscale, out=lt)
        if in_range:
            return lt.clamp_(-nmax, nmax - 1).round_()
        return lt.copy_(_round_clamp(lt, -nmax, nmax - 1, exact=True))

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lv = codes(iscale)
        torch.mul(w, lv, out=wl2).mul_(lv)
        lv.mul_(wx)
        sumlx, suml2 = seq_sum(buf)
        return sumlx, suml2

    iscale = iscales[0]
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, div(sumlx, suml2), 0.0)
    best = scale * sumlx
    best_iscale = iscale
    for iscale in iscales[1:]:
        sumlx, suml2 = sums(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        sc = div(sumlx, suml2)
        scale = torch.where(take, sc, scale)
        best = torch.where(take, sc * sumlx, best)
        best_iscale = torch.where(take, iscale, best_iscale)
    L = codes(best_iscale) + nmax
    return torch.where(zero, 0.0, scale), L.mul_((~zero).to(_F32))


def _descend(x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, L: torch.Tensor,
             sumlx: torch.Tensor, suml2: torch.Tensor, lo: int | None, hi: int,
             qp_rules: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinate descent shared by ``make_q3_quants`` and ``make_qp_quants``, step by step
    as ggml runs it; updates ``L`` (``(n, R)``) in place and returns the final ``(sumlx,
    suml2)``. The Q3_K encoder runs the faster, equivalent
    :func:`._kquant_search_q3._descend_q3` instead (the tests check the two agree).

    Up to five passes; within a pass, element ``i`` of every column in turn: drop its term from the
    sums, re-round ``x*sl2/slx``, and keep the new code if ``slx'^2/sl2'`` strictly improves.
    ggml's two variants differ in details reproduced here: q3 needs ``slx > 0`` and
    ``sl2' > 0`` and clamps to ``[lo, hi]``; qp needs ``slx > 0`` and ``sl2 > 0``, only caps at
    ``hi``, and stores the code in a ``uint8_t`` (sums keep the unwrapped value).

    ggml stops a column after a pass that changes nothing in it; such a pass leaves the column as
    it was, so later passes would change nothing either. Each pass therefore runs only on the
    columns the previous pass changed.
    """
    cols = None  # all columns
    xs, ws, wxs, Ls, slx_all, sl2_all = x, w, wx, L, sumlx, suml2
    for _ in range(5):
        changed = torch.zeros_like(slx_all, dtype=torch.bool)
        for i in range(xs.shape[0]):
            li = Ls[i]
            slx = slx_all - wxs[i] * li
            sl2 = sl2_all - (ws[i] * li) * li
            v = div(xs[i] * sl2, slx)
            lo_v, hi_v = (float(t) for t in torch.aminmax(v))
            if -SMALL_ROUND_LIMIT < lo_v and hi_v < SMALL_ROUND_LIMIT:  # no NaN either
                # nearest_int is round-half-even here; + 0.0 turns a -0.0 (from a small
                # negative v) into the +0.0 that ggml's int 0 converts to.
                new = round_small_(v).add_(0.0)
                wraps = lo_v <= -0.5  # a negative code: qp stores it in a uint8_t
            else:
                new = nearest_int(v).to(_F32)
                wraps = True
            new = new.clamp_(lo, hi) if lo is not None else new.clamp_(max=hi)
            slx_n = slx + wxs[i] * new
            sl2_n = sl2 + (ws[i] * new) * new
            better = (slx_n * slx_n) * sl2_all > (slx_all * slx_all) * sl2_n
            take = (slx > 0) & (new != li) & better
            take &= (sl2 > 0) if qp_rules else (sl2_n > 0)
            if qp_rules and wraps:
                new = (new.to(torch.int32) & 0xFF).to(_F32)
            Ls[i] = torch.where(take, new, li)
            slx_all = torch.where(take, slx_n, slx_all)
            sl2_all = torch.where(take, sl2_n, sl2_all)
            changed |= take
        if cols is None:
            sumlx, suml2 = slx_all, sl2_all
            cols = changed.nonzero().squeeze(1)
        else:
            L[:, cols], sumlx[cols], suml2[cols] = Ls, slx_all, sl2_all
            cols = cols[changed]
        if cols.numel() == 0:
            break
        xs, ws, wxs, Ls = x[:, cols], w[:, cols], wx[:, cols], L[:, cols]
        slx_all, sl2_all = sumlx[cols], suml2[cols]
    return sumlx, suml2


def _make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qp_quants``: quantize the (non-negative) sub-block scales ``x`` of each column
    of ``(n, B)`` to ``L`` in ``[0, nmax]`` with weights ``w``: 9 trial inverse scales by weighted
    squared error, then coordinate descent as in ``make_q3_quants``.

    ggml keeps ``L`` in a ``uint8_t`` but the sums in ``int``: a negative code (only possible
    for a negative input scale) wraps in ``L`` and not in the sums; reproduced.
    Returns ``(scale (B,), L (n, B) float32 holding the uint8 values)``.
    """
    n = x.shape[0]
    mx = torch.zeros_like(x[0])
    for i in range(n):  # MAX(max, x): NaN handling depends on the order
        mx = torch.where(mx > x[i], mx, x[i])
    zero = mx < GROUP_MAX_EPS
    iscale = div(float(nmax), mx)
    L = (nearest_int(iscale * x) & 0xFF).to(_F32)
    scale = div(1.0, iscale)
    d = x - scale * L
    best = seq_sum((w * d).mul_(d))
    # The 8 trials do not depend on one another: all at once, (n, 8, B). A trial is taken when
    # its error is strictly below the best so far, so the one kept is the first attaining the
    # smallest error, the first guess (index 0) included and winning ties; a NaN error is
    # never taken (+inf), and a NaN first guess is never replaced (-inf).
    nums = [f32(f32(f32(0.1) * i) + float(nmax)) for i in (-4, -3, -2, -1, 1, 2, 3, 4)]
    iscales = div(torch.tensor(nums, dtype=_F32, device=x.device).unsqueeze(1), mx)  # (8, B)
    li = nearest_int(iscales * x.unsqueeze(1)).clamp_(max=nmax).to(_F32)
    d = x.unsqueeze(1) - div(1.0, iscales) * li
    mse = seq_sum((w.unsqueeze(1) * d).mul_(d))
    keys = torch.cat([torch.where(torch.isnan(best), -torch.inf, best).unsqueeze(0),
                      torch.where(torch.isnan(mse), torch.inf, mse)])
    pick = keys.min(0, keepdim=True).indices  # first of equal minima; argmin(0) is 7x slower
    iscale = torch.cat([iscale.unsqueeze(0), iscales]).gather(0, pick).squeeze(0)
    li = nearest_int(iscale * x).clamp_(max=nmax)
    L = (li & 0xFF).to(_F32)
    li = li.to(_F32)
    wx = w * x
    sumlx = seq_sum(wx * li)
    suml2 = seq_sum((w * li).mul_(li))
    sumlx, suml2 = _descend(x, w, wx, L, sumlx, suml2, None, nmax, qp_rules=True)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, L)


def _make_qp_pair(scale: torch.Tensor, the_min: torch.Tensor, sw: torch.Tensor, nb: int,
                  nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_make_qp` of a block's sub-block scales and of its mins (both ``(nb*S,)`` from the
    searches, weights ``sw`` ``(nb, S)``) in one call: the columns are independent, and on
    these small tensors the cost is per op, not per element.
    Returns ``(d (nb,), Ls (S, nb), dmin (nb,), Lm (S, nb))``."""
    both = torch.cat([_sub_scales(scale, nb), _sub_scales(the_min, nb)]).t().contiguous()
    wt = sw.t()
    d, L = _make_qp(both, torch.cat([wt, wt], dim=1).contiguous(), nmax)
    return d[:nb], L[:, :nb], d[nb:], L[:, nb:]


def _sub_scales(v: torch.Tensor, nb: int) -> torch.Tensor:
    """A per-sub-block vector ``(nb*S,)`` from the position-major searches as ``(nb, S)``."""
    return v.view(nb, -1)
