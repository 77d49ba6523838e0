"""K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) byte-identical to ggml's ``ggml_quantize_chunk``.

Without an importance matrix ggml runs its ``quantize_row_*_ref`` searches; with one, the
``quantize_row_*_impl`` searches weighted by it. Both are reproduced here as array code over all
blocks at once. What makes the bytes identical rather than merely close:

* every product, quotient and sum is one IEEE float32 rounding in ggml's operand order (the oracle
  is built without FMA contraction, and torch never fuses a separate mul and add);
* sums of 8/16/32/256 terms run left to right, as C ``for`` loops do: tensors here are
  *position-major* ``(P, rows, ...)`` so a sequential sum walks contiguous slices, each step
  vectorized over every group;
* ``nearest_int`` is ggml's magic-number trick bit for bit (including what it does with
  out-of-range values, infinities and NaN), and integer results are truncated to ``uint8`` /
  ``int8`` where ggml stores them in such a variable;
* the candidate scales a search tries run in ggml's order, each vectorized over all groups, with
  its running "strictly better than the best so far" choice (a taken trial can change what later
  trials start from, so they cannot be batched); ties keep the first, NaN never wins;
* ``sqrtf`` is correctly rounded (torch's float32 CPU sqrt is not), divisions never become
  multiplications by a reciprocal, and scales are rounded to float16 (round-to-nearest-even) and
  read back where ggml re-reads them.

Entry points take ``x`` float32 ``(n_blocks, 256)`` and ``imatrix`` ``None`` or float32
``(n_blocks, 256)`` (the importance weights of each block's positions) on any device and return
the blocks as uint8 ``(n_blocks, type_size)``.

The layouts come from :mod:`.kquants` (declared once there).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..errors import QuantizationError
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
    sqrt,
    to_fp16,
)

__all__ = ["quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]

QK_K = 256
_F32 = torch.float32
_NINT_SAFE = 4194303.0  # |x| up to this: the trick is exact (ggml asserts it, release builds don't)
# Blocks per chunk (per pair of intra-op threads): bounds the temporaries whatever the tensor
# size. A trial costs a fixed ~25 small ops per chunk plus its full passes over five
# (32, 8*chunk) float32 buffers, so the chunk is as large as keeps those in the last-level cache:
# on a 2-core x86, 2048 blocks (2 MiB per buffer) measured 10-15% faster than 1024 and than
# 3072, and 256 half as fast. A GPU wants far larger chunks.
_CHUNK_BLOCKS = 2048
_CHUNK_BLOCKS_GPU = 1 << 16
# Q3_K without an importance matrix: chunks this many times larger. After its first round, the
# descent (_descend_q3) runs a dozen rounds of a few dozen ops on the few columns still
# changing; their cost is per op, so fewer, larger chunks share it.
# 4096 blocks measured about 20% faster than 2048 on a shared 2-core x86 (noisy), 8192 no better.
_Q3_CHUNK_SCALE = 2

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
    suml2)``. The Q3_K encoder runs the faster, equivalent :func:`_descend_q3` instead (the
    tests check the two agree).

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
    for i, t in enumerate((x, w, wx, G)):
        torch.gather(t, 1, keep.expand(t.shape[0], -1), out=st[i * P:i * P + t.shape[0]])
    st[4 * P + 3] = 0.0
    st[4 * P + 4].view(torch.int32).copy_(keep)
    ptr, npass = st[4 * P + 2], st[4 * P + 3]
    k: torch.Tensor = key.index_select(0, keep)
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


# ---------------------------------------------------------------------------------------------
# Final re-quantization and bit packing
# ---------------------------------------------------------------------------------------------
def _requant_affine(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dm: torch.Tensor,
                    nmax: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``L = clamp(nearest_int((x + dm)/d), 0, nmax)`` per sub-block ``(nb, S)`` scales, except
    where ``d == 0``: ggml skips those sub-blocks and keeps the search's ``L`` (position-major
    ``(256/S, nb*S)``, brought to block order only then). The new codes are computed in
    ``out`` (shaped like ``x``) when given."""
    nb, S = d.shape
    g = QK_K // S
    xv = x.view(nb, S, g)
    if out is None:
        new = _round_clamp(div(xv + dm.unsqueeze(2), d.unsqueeze(2)), 0, nmax)
    else:
        new = torch.add(xv, dm.unsqueeze(2), out=out.view(nb, S, g)).div_(d.unsqueeze(2))
        lo_v, hi_v = torch.aminmax(new)
        if bool((hi_v <= _NINT_SAFE) & (lo_v >= -_NINT_SAFE)):  # no NaN, in the trick's range
            new.clamp_(0, nmax).round_()
        else:
            new.copy_(_round_clamp(new, 0, nmax, exact=True))
    return _keep_where((d == 0).unsqueeze(2), lambda: _block_major(L, nb).view(nb, S, g),
                       new).reshape(nb, QK_K)


def _requant_symmetric(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor,
                       nmax: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``L = clamp(nearest_int(x/d), -nmax, nmax-1) + nmax`` per sub-block, keeping the search's
    ``L`` (position-major, as for :func:`_requant_affine`) where ``d == 0``. The new codes are
    computed in ``out`` (shaped like ``x``) if given."""
    nb, S = d.shape
    g = QK_K // S
    if out is None:
        new = _round_clamp(div(x.view(nb, S, g), d.unsqueeze(2)), -nmax, nmax - 1) + nmax
    else:
        new = torch.div(x.view(nb, S, g), d.unsqueeze(2), out=out.view(nb, S, g))
        lo_v, hi_v = torch.aminmax(new)
        if bool((hi_v <= _NINT_SAFE) & (lo_v >= -_NINT_SAFE)):  # no NaN, in the trick's range
            new.clamp_(-nmax, nmax - 1).round_().add_(nmax)
        else:
            new.copy_(_round_clamp(new, -nmax, nmax - 1, exact=True)).add_(nmax)
    return _keep_where((d == 0).unsqueeze(2), lambda: _block_major(L, nb).view(nb, S, g),
                       new).reshape(nb, QK_K)


def _pack_crumbs(L: torch.Tensor) -> torch.Tensor:
    """2-bit codes ``(nb, 256)`` -> ``qs (nb, 64)``: byte ``32h + l`` holds codes ``128h + 32k + l``
    at bits ``2k`` (Q2_K and Q3_K)."""
    q = L.to(torch.int32).view(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.to(torch.uint8).reshape(-1, 64)


def _pack_nibbles64(L: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``(nb, 256)`` -> ``(nb, 128)``: byte ``32c + l`` holds code ``64c + l`` (low) and
    ``64c + 32 + l`` (high) (Q4_K, and Q5_K's low nibbles)."""
    q = (L.to(torch.int32) & 0xF).view(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).to(torch.uint8).reshape(-1, 128)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins ``(nb, 8)`` (int32, may exceed 63 in one ggml path) into the 12
    ``scales`` bytes of Q4_K/Q5_K, with ggml's ``uint8_t`` truncations."""
    lo = (ls[:, :4] | (((ls[:, 4:] >> 4) << 6) & 0xFF)) & 0xFF
    mid = (lm[:, :4] | (((lm[:, 4:] >> 4) << 6) & 0xFF)) & 0xFF
    hi = ((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)) & 0xFF
    return torch.cat([lo, mid, hi], dim=1).to(torch.uint8)


def _unpack_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``get_scale_min_k4`` for all 8 sub-blocks: ``(nb, 12)`` bytes -> float32
    ``(sc, m)``."""
    b = b.to(torch.int32)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], dim=1)
    return sc.to(_F32), m.to(_F32)


def _pack_q3_scales(l6: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit codes ``(nb, 16)`` in ``[0, 63]`` -> Q3_K's 12 ``scales`` bytes: low nibbles of
    codes j and j+8 share byte j; the top two bits of code j go to byte ``8 + j%4`` at bit
    ``2*(j//4)``."""
    q = l6.to(torch.int32)
    low = (q[:, :8] & 0xF) | ((q[:, 8:] & 0xF) << 4)
    top = (q >> 4).view(-1, 4, 4)  # [j//4][j%4]
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return torch.cat([low, high], dim=1).to(torch.uint8)


def _sub_scales(v: torch.Tensor, nb: int) -> torch.Tensor:
    """A per-sub-block vector ``(nb*S,)`` from the position-major searches as ``(nb, S)``."""
    return v.view(nb, -1)


# ---------------------------------------------------------------------------------------------
# The five types
# ---------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, imatrix: torch.Tensor | None, name: str) -> None:
    """Raise :class:`QuantizationError` unless ``x``/``imatrix`` are float32 ``(n, 256)``."""
    if x.dim() != 2 or x.shape[1] != QK_K or x.dtype != _F32:
        raise QuantizationError(f"{name}: expected float32 blocks of shape (n, {QK_K}), "
                                f"got {tuple(x.shape)} {x.dtype}")
    if imatrix is not None and (imatrix.shape != x.shape or imatrix.dtype != _F32):
        raise QuantizationError(f"{name}: expected an imatrix of shape {tuple(x.shape)} float32, "
                                f"got {tuple(imatrix.shape)} {imatrix.dtype}")


def _chunked(fn, x: torch.Tensor, imatrix: torch.Tensor | None, name: str,
             scratch: bool = False, scale: int = 1) -> torch.Tensor:
    """Run ``fn(x_chunk, imatrix_chunk)`` over chunks of blocks and stack the byte rows; with
    ``scratch``, ``fn`` also gets a :class:`_Scratch` shared by all chunks. CPU chunks are
    ``scale`` times the usual size."""
    _check(x, imatrix, name)
    x = x.contiguous()
    if imatrix is not None:
        imatrix = imatrix.to(x.device).contiguous()
    outs = []
    if x.device.type == "cpu":  # more threads usually come with more cache
        step = _CHUNK_BLOCKS * scale * max(1, torch.get_num_threads() // 2)
    else:
        step = _CHUNK_BLOCKS_GPU
    if scratch:
        fn = partial(fn, scratch=_Scratch())
    for s in range(0, x.shape[0], step):
        outs.append(fn(x[s:s + step], None if imatrix is None else imatrix[s:s + step]))
    if not outs:
        from .base import get_quant_type

        return torch.empty((0, get_quant_type(name).type_size()), dtype=torch.uint8,
                           device=x.device)
    return torch.cat(outs)


def _block_sum_x2(x: torch.Tensor) -> torch.Tensor:
    """``sumx2 = sum of x[j]*x[j]`` over the 256 elements of each block, left to right."""
    return seq_sum((x * x).t().contiguous())


def _q2_k(x: torch.Tensor, qw: torch.Tensor | None,
          scratch: _Scratch | None = None) -> torch.Tensor:
    """Q2_K: 16 groups of 16, ``x ~ d*sc*q - dmin*m`` with 4-bit ``sc``/``m`` and 2-bit ``q``."""
    from .kquants import Q2_K

    scratch = scratch or _Scratch()
    nb = x.shape[0]
    shape = (16, nb * 16)
    X = _pos_major(x, 16, scratch.get("X", shape, x.device))
    if qw is None:
        weights = torch.abs(X, out=scratch.get("weights", shape, x.device))
        scale, the_min, L = _make_qkx(X, weights, 3, -0.5, 0.1, 15, use_mad=True,
                                      scratch=scratch)
        scales, mins = _sub_scales(scale, nb), _sub_scales(the_min, nb)
        max_scale, max_min = _running_max_pos(scales), _running_max_pos(mins)
        ls = nearest_int(div(15.0, max_scale).unsqueeze(1) * scales) & 0xFF
        ls = torch.where((max_scale > 0).unsqueeze(1), ls, 0)
        lm = nearest_int(div(15.0, max_min).unsqueeze(1) * mins)
        byte = torch.where((max_min > 0).unsqueeze(1), (ls | (lm << 4)) & 0xFF, ls)
        d16 = _to_fp16(torch.where(max_scale > 0, div(max_scale, 15.0), 0.0))
        dmin16 = _to_fp16(torch.where(max_min > 0, div(max_min, 15.0), 0.0))
    else:
        sigma2 = div(_block_sum_x2(x), float(QK_K))
        weight = _imatrix_weights(X, qw, sigma2.repeat_interleave(16), scratch)
        sw = _sub_scales(seq_sum(weight), nb)
        scale, the_min, L = _make_qkx(X, weight, 3, -0.9, 0.05, 36, use_mad=False,
                                      scratch=scratch)
        dm, Ls, mm, Lm = _make_qp_pair(scale, the_min, sw, nb, 15)
        d16, dmin16 = _to_fp16(dm), _to_fp16(mm)
        byte = (Ls.t().to(torch.int32) | (Lm.t().to(torch.int32) << 4)) & 0xFF
    d = d16.to(_F32).unsqueeze(1) * (byte & 0xF).to(_F32)
    dm_ = dmin16.to(_F32).unsqueeze(1) * (byte >> 4).to(_F32)
    Lb = _requant_affine(x, L,
                         d, dm_, 3, out=scratch.get("requant", (nb, QK_K), x.device))
    return Q2_K.layout.pack(scales=byte.to(torch.uint8), qs=_pack_crumbs(Lb),
                            d=d16.unsqueeze(1), dmin=dmin16.unsqueeze(1))


def _q3_k(x: torch.Tensor, qw: torch.Tensor | None,
          scratch: _Scratch | None = None) -> torch.Tensor:
    """Q3_K: 16 groups of 16, ``x ~ d*(sc-32)*(q-4)`` with 6-bit ``sc`` and 3-bit ``q``."""
    from .kquants import Q3_K

    scratch = scratch or _Scratch()
    nb = x.shape[0]
    X = _pos_major(x, 16, scratch.get("X", (16, nb * 16), x.device))
    if qw is None:
        scale, L = _make_q3(X, 4, scratch=scratch)
        scales = _sub_scales(scale, nb)
        _, max_scale = first_abs_max(scales, 1, nan_never_wins=True)
        has = max_scale != 0
        iscale = div(-32.0, max_scale)
        l8 = nearest_int(iscale.unsqueeze(1) * scales)
        l8 = ((l8 & 0xFF) ^ 0x80) - 0x80  # stored in an int8_t
        l6 = torch.where(has.unsqueeze(1), l8.clamp(-32, 31) + 32, 0)
        d16 = _to_fp16(torch.where(has, div(1.0, iscale), 0.0))
        packed = torch.where(has.unsqueeze(1), _pack_q3_scales(l6), 0)
    else:
        sigma2 = div(2.0 * _block_sum_x2(x), float(QK_K))
        weight = _imatrix_weights(X, qw, sigma2.repeat_interleave(16), scratch)
        sw = _sub_scales(seq_sum(weight), nb)
        scale, L = _make_qx(X, weight, 4, scratch=scratch)
        d_block, Ls = _make_qx(_sub_scales(scale, nb).t().contiguous(), sw.t().contiguous(), 32)
        l6 = Ls.t().to(torch.int32)
        packed = _pack_q3_scales(l6)
        d16 = _to_fp16(d_block)
    d = d16.to(_F32).unsqueeze(1) * (l6 - 32).to(_F32)
    Lb = scratch.get("codes", (nb, QK_K), x.device, torch.int32)
    Lb.copy_(_requant_symmetric(x, L, d, 4, out=scratch.get("requant", (nb, QK_K), x.device)))
    # Codes are in [0, 7]: bit 2 goes to hmask, bits 0-1 to qs. Integer bit ops in scratch
    # buffers: a bool comparison and bool arithmetic, or fresh multi-MiB results (new pages
    # to fault in), cost several times more on CPU.
    hm = torch.bitwise_right_shift(Lb, 2, out=scratch.get("high", (nb, QK_K), x.device,
                                                          torch.int32)).view(nb, 8, 32)
    hmask = hm[:, 0]
    for k in range(1, 8):
        hmask = hmask | (hm[:, k] << k)
    return Q3_K.layout.pack(hmask=hmask.to(torch.uint8), qs=_pack_crumbs(Lb.bitwise_and_(3)),
                            scales=packed.to(torch.uint8), d=d16.unsqueeze(1))


def _imatrix_weights(X: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor,
                     scratch: _Scratch) -> torch.Tensor:
    """ggml's ``qw[i] * sqrtf(sigma2 + x[i]*x[i])`` for position-major ``X`` ``(P, R)``, the
    block-major importance ``qw`` and one ``sigma2`` per column, in scratch buffers (the
    square root in float64 rounded once to float32: correctly rounded, as :func:`sqrt`)."""
    P, R = X.shape
    w = torch.mul(X, X, out=scratch.get("weights", (P, R), X.device)).add_(sigma2)
    w64 = scratch.get("weights64", (P, R), X.device, torch.float64)
    w.copy_(w64.copy_(w).sqrt_())
    return w.mul_(_pos_major(qw, P, scratch.get("Q", (P, R), X.device)))


def _q45_k(x: torch.Tensor, qw: torch.Tensor | None, nmax: int,
           scratch: _Scratch | None = None) -> torch.Tensor:
    """Q4_K (``nmax`` 15) and Q5_K (31): identical searches, different code width."""
    from .kquants import Q4_K, Q5_K

    scratch = scratch or _Scratch()
    nb = x.shape[0]
    shape = (32, nb * 8)
    X = _pos_major(x, 32, scratch.get("X", shape, x.device))
    if qw is None:
        weights = scratch.get("weights", shape, x.device)
        av_x = sqrt(div(seq_sum(torch.mul(X, X, out=weights)), 32.0))
        torch.abs(X, out=weights).add_(av_x)  # av_x + fabsf(x): one rounding either way
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scale, the_min, L = _make_qkx(X, weights, nmax, rmin, 0.1, nstep, use_mad=False,
                                      scratch=scratch)
        scales, mins = _sub_scales(scale, nb), _sub_scales(the_min, nb)
        max_scale, max_min = _running_max_pos(scales), _running_max_pos(mins)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), 0.0)
        ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp_(max=63)
        lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp_(max=63)
        d16 = _to_fp16(div(max_scale, 63.0))
        dmin16 = _to_fp16(div(max_min, 63.0))
    else:
        sigma2 = div(2.0 * _block_sum_x2(x), float(QK_K))
        weights = _imatrix_weights(X, qw, sigma2.repeat_interleave(8), scratch)
        sw = _sub_scales(seq_sum(weights), nb)
        scale, the_min, L = _make_qkx(X, weights, nmax, -0.9, 0.05, 36, use_mad=False,
                                      scratch=scratch)
        d_block, Ls, m_block, Lm = _make_qp_pair(scale, the_min, sw, nb, 63)
        ls, lm = Ls.t().to(torch.int32), Lm.t().to(torch.int32)
        if nmax == 31:  # only Q5_K's impl clamps the codes to 6 bits before packing
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        d16, dmin16 = _to_fp16(d_block), _to_fp16(m_block)
    packed = _pack_scale_min_k4(ls, lm)
    sc, m = _unpack_scale_min_k4(packed)
    d = d16.to(_F32).unsqueeze(1) * sc
    dm = dmin16.to(_F32).unsqueeze(1) * m
    Lb = _requant_affine(x, L,
                         d, dm, nmax, out=scratch.get("requant", (nb, QK_K), x.device))
    qs = _pack_nibbles64(Lb)
    if nmax == 15:
        return Q4_K.layout.pack(d=d16.unsqueeze(1), dmin=dmin16.unsqueeze(1), scales=packed, qs=qs)
    hb = (Lb.to(torch.int32) >> 4).view(nb, 8, 32)
    qh = hb[:, 0]
    for k in range(1, 8):
        qh = qh | (hb[:, k] << k)
    return Q5_K.layout.pack(d=d16.unsqueeze(1), dmin=dmin16.unsqueeze(1), scales=packed,
                            qh=qh.to(torch.uint8), qs=qs)


def _q6_k(x: torch.Tensor, qw: torch.Tensor | None,
          scratch: _Scratch | None = None) -> torch.Tensor:
    """Q6_K: 16 groups of 16, ``x ~ d*sc*(q-32)`` with int8 ``sc`` and 6-bit ``q``."""
    from .kquants import Q6_K

    scratch = scratch or _Scratch()
    nb = x.shape[0]
    shape = (16, nb * 16)
    X = _pos_major(x, 16, scratch.get("X", shape, x.device))
    Q = None if qw is None else _pos_major(qw, 16, scratch.get("Q", shape, x.device))
    scale, L = _make_qx(X, Q, 32, scratch=scratch)
    scales = _sub_scales(scale, nb)
    amax, max_scale = first_abs_max(scales, 1, nan_never_wins=True)
    empty = amax < GROUP_MAX_EPS
    iscale = div(-128.0, max_scale)
    d16 = _to_fp16(torch.where(empty, 0.0, div(1.0, iscale)))
    sc8 = nearest_int(iscale.unsqueeze(1) * scales).clamp_(max=127)
    sc8 = ((sc8 & 0xFF) ^ 0x80) - 0x80  # stored in an int8_t
    sc8 = torch.where(empty.unsqueeze(1), 0, sc8)
    d = d16.to(_F32).unsqueeze(1) * sc8.to(_F32)
    Lb = _requant_symmetric(x, L,
                            d, 32, out=scratch.get("requant", (nb, QK_K), x.device))
    Lb = Lb.to(torch.int32).mul_((~empty).unsqueeze(1).to(torch.int32))  # ggml zeroes the block
    q = Lb.view(nb, 2, 4, 32)
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                    (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], dim=2)  # (nb, 2, 64)
    h = q >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)  # (nb, 2, 32)
    return Q6_K.layout.pack(ql=ql.to(torch.uint8).reshape(nb, 128),
                            qh=qh.to(torch.uint8).reshape(nb, 64),
                            scales=sc8.to(torch.int8), d=d16.unsqueeze(1))


def quantize_q2_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Quantize float32 ``(n, 256)`` to Q2_K blocks (uint8, ``Q2_K.layout``), as ggml does with
    ``imatrix`` (float32 ``(n, 256)`` weights) or without (``None``)."""
    return _chunked(_q2_k, x, imatrix, "Q2_K", scratch=True)


def quantize_q3_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Quantize float32 ``(n, 256)`` to Q3_K blocks (uint8, ``Q3_K.layout``), as ggml does with
    ``imatrix`` (float32 ``(n, 256)`` weights) or without (``None``)."""
    return _chunked(_q3_k, x, imatrix, "Q3_K", scratch=True,
                    scale=_Q3_CHUNK_SCALE if imatrix is None else 1)


def quantize_q4_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Quantize float32 ``(n, 256)`` to Q4_K blocks (uint8, ``Q4_K.layout``), as ggml does with
    ``imatrix`` (float32 ``(n, 256)`` weights) or without (``None``)."""
    return _chunked(partial(_q45_k, nmax=15), x, imatrix, "Q4_K", scratch=True)


def quantize_q5_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Quantize float32 ``(n, 256)`` to Q5_K blocks (uint8, ``Q5_K.layout``), as ggml does with
    ``imatrix`` (float32 ``(n, 256)`` weights) or without (``None``)."""
    return _chunked(partial(_q45_k, nmax=31), x, imatrix, "Q5_K", scratch=True)


def quantize_q6_k(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Quantize float32 ``(n, 256)`` to Q6_K blocks (uint8, ``Q6_K.layout``), as ggml does with
    ``imatrix`` (float32 ``(n, 256)`` weights) or without (``None``)."""
    return _chunked(_q6_k, x, imatrix, "Q6_K", scratch=True)
