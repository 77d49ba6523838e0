"""Float32 building blocks that reproduce ggml's scalar quantizer arithmetic exactly, in torch.

ggml's quantizers are scalar C built without FMA contraction, so every product, quotient and sum is
one IEEE float32 rounding, sums run left to right from ``0.0f``, ties go to the first element, and
a few conversions rely on what x86 does with out-of-range values. Each helper here reproduces one
such idiom, vectorized over blocks, so the encoders can be written as array code and still produce
ggml's bytes on CPU and CUDA alike.

Conventions: tensors are float32; a "position-major" tensor has the element position inside a
group as its first dim and the blocks as its last (``(32, ..., n_blocks)``), so sequential sums
walk contiguous slices and every elementwise op is a long vector loop over blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "GROUP_MAX_EPS",
    "SMALL_ROUND_LIMIT",
    "device_step",
    "div",
    "f32",
    "first_abs_max",
    "first_extreme",
    "high_bit_bytes",
    "nearest_int",
    "pack_nibbles",
    "recip_or_zero",
    "round_small_",
    "seq_sum",
    "seq_sum_slots",
    "sqrt",
    "to_fp16",
]


def f32(value: float) -> float:
    """``value`` rounded to float32, as a C ``float`` literal or expression would be."""
    return float(np.float32(value))


#: ggml treats a group whose largest magnitude is below this as all zeros (``GROUP_MAX_EPS``).
GROUP_MAX_EPS = f32(1e-15)

# 1.5 * 2**23: adding it to a float32 of magnitude < 2**22 leaves round-half-even(x) in the low
# mantissa bits. ggml's nearest_int relies on this trick; reproducing the bit manipulation
# reproduces its result for out-of-range inputs too (round_small_ is the fast in-range form).
_MAGIC = 12582912.0


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """``a / b`` in float32 with one rounding.

    Python scalars are turned into 0-d tensors on the other operand's device first: PyTorch's CUDA
    division by a CPU scalar multiplies by the scalar's reciprocal, which rounds twice.
    """
    ref = a if isinstance(a, torch.Tensor) else b
    assert isinstance(ref, torch.Tensor)
    if not isinstance(a, torch.Tensor):
        a = torch.full((), a, dtype=torch.float32, device=ref.device)
    if not isinstance(b, torch.Tensor):
        b = torch.full((), b, dtype=torch.float32, device=ref.device)
    return torch.div(a, b)


def recip_or_zero(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` (a NaN ``d`` is "true" in C and gives NaN)."""
    return torch.where(d != 0, div(1.0, d), 0.0)


def sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrtf``, correctly rounded.

    PyTorch's vectorized float32 sqrt on CPU is not always correctly rounded (off by one ulp on a
    fraction of inputs); a float64 square root rounded once to float32 always is, because float64
    carries more than twice float32's precision.
    """
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even through the float32 magic-number trick (int32).

    The trick reads mantissa bits, so for NaN it depends on the NaN's payload. With finite input
    every NaN in ggml's arithmetic is x86's default NaN (payload 0x400000), giving 0; other
    hardware (CUDA) makes NaNs with other payloads, so NaN is mapped to 0 explicitly.
    """
    out = (v + _MAGIC).view(torch.int32).bitwise_and_(0x007FFFFF).sub_(0x00400000)
    # In place on the fresh result: a where with a Python scalar costs a scalar-tensor
    # conversion per call, which adds up in the per-element loops of the searches.
    return out.masked_fill_(torch.isnan(v), 0)


# x86's default NaN (sign set) as ggml's fp32->fp16 conversion writes it: (sign >> 16) | 0x7E00.
_FP16_X86_NAN = -512  # 0xFE00 as int16


def to_fp16(v: torch.Tensor, native_cpu_nan: bool = False) -> torch.Tensor:
    """float32 -> float16 rounded to nearest even, with a NaN stored as ggml on x86 stores it.

    A NaN scale comes from an invalid operation on finite input (0/0, inf/inf, inf-inf, 0*inf);
    x86 produces a negative quiet NaN, which ggml converts to 0xFE00. CUDA produces a positive one
    and torch converts it to 0x7FFF; patching the bits makes the bytes device-independent.

    ``native_cpu_nan`` keeps torch's own conversion on CPU (sign and payload of the NaN carried
    over, as ggml's conversion does with the same x86 NaN) and patches only on other devices; the
    K-quant encoders rely on it.
    """
    h = v.to(torch.float16)
    if native_cpu_nan and v.device.type == "cpu":
        return h
    return torch.where(torch.isnan(v), _FP16_X86_NAN, h.view(torch.int16)).to(
        torch.int16).view(torch.float16)


def device_step(base: int, device: torch.device) -> int:
    """Items per internal step of a search: ``base`` on CPU (cache-sized), far more on a GPU,
    where each step's cost is dominated by kernel launches rather than memory traffic."""
    return base * 16 if device.type == "cuda" else base


#: Below this magnitude :func:`nearest_int` equals :func:`round_small_` (with margin).
SMALL_ROUND_LIMIT = float(2**21)


def round_small_(v: torch.Tensor) -> torch.Tensor:
    """In place: ``nearest_int(v)`` as float32, valid for ``|v| < 2**22``.

    There ggml's bit trick is plain round-half-to-even, which ``torch.round`` computes in one
    pass with no integer conversions; callers must know (or check) that ``v`` is in range.
    """
    return v.round_()


_ZERO_INDEX: dict[int, torch.Tensor] = {}
# Bags per embedding_bag call: enough for torch to spread them over its threads; widths from
# a handful of powers of two keep the number of distinct kernels fbgemm generates small.
_MAX_BAGS = 64
_MIN_BAG_WIDTH = 64
_BAG_PLANS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _bags_for(n: int) -> int:
    """How many equal column slices (bags) to cut ``n`` columns into; 0 when none fits."""
    bags = _MAX_BAGS
    while bags > 1 and (n % bags or n // bags < _MIN_BAG_WIDTH):
        bags //= 2
    return bags if n and n % bags == 0 else 0


def _bag_sum(terms: torch.Tensor, slots: tuple[int, ...], bags: int) -> torch.Tensor:
    """In-order sums over dim 0 of slots ``slots`` of contiguous float32 ``terms`` ``(P, K, R)``
    as one ``embedding_bag``: bag ``(s, j)`` is column slice ``j`` of slot ``s`` at every
    position, in position order, i.e. rows ``(i*K + s)*bags + j`` of the ``(P*K*bags, R/bags)``
    view. Returns ``(len(slots), R)``."""
    p, k, n = terms.shape
    key = (p, k, bags, slots)
    plan = _BAG_PLANS.get(key)
    if plan is None:
        pos = torch.arange(p) * (k * bags)
        rows = [pos + s * bags + j for s in slots for j in range(bags)]
        plan = _BAG_PLANS[key] = (torch.cat(rows), torch.arange(len(slots) * bags) * p)
    idx, offsets = plan
    return torch.nn.functional.embedding_bag(
        idx, terms.view(p * k * bags, -1), offsets, mode="sum").view(len(slots), n)


def seq_sum(terms: torch.Tensor, start: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``terms`` along dim 0 one term at a time in float32, as a C ``for`` loop does.

    Starts from ``start`` or from ``+0.0`` (``float s = 0; s += t;`` turns a lone ``-0.0`` into
    ``+0.0``, which can decide the sign of a scale). A tree-ordered ``torch.sum`` rounds
    differently. ``out`` (shaped like ``terms[0]``) receives the result if given.

    On CPU, for contiguous ``terms`` and no ``start``, this is one ``embedding_bag`` in ``sum``
    mode: its kernel clears an accumulator (``+0.0``) and adds the bag's rows one after another
    in index order, each a float32 add vectorized over the columns (fbgemm's kernel; its
    portable fallbacks add with ``axpy``/``fma`` by exactly 1, the same single rounding), and
    it is several times faster than any other in-order reduction torch has. With ``start``, an
    ``index_add_`` of every term into a copy of it (torch's in-order loop of float32 adds;
    slower: it walks the terms element by element). CUDA's ``index_add_`` accumulates with
    atomics in no fixed order, so other devices take the explicit loop.
    """
    n = terms.shape[0]
    contiguous_cpu = _cpu_fast(terms)
    if contiguous_cpu and start is None and terms.dtype == torch.float32:
        bags = _bags_for(terms[0].numel())
        if bags:
            res = _bag_sum(terms.view(n, 1, -1), (0,), bags).view(terms.shape[1:])
            return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(terms.shape[1:], dtype=terms.dtype, device=terms.device)
    if start is None:
        out.zero_()
    else:
        out.copy_(start)
    # Only contiguous terms: for strided ones torch's index_add_ leaves its fast loop (10x slower).
    if contiguous_cpu:
        idx = _ZERO_INDEX.get(n)
        if idx is None:
            idx = _ZERO_INDEX[n] = torch.zeros(n, dtype=torch.long)
        out.unsqueeze(0).index_add_(0, idx, terms)
        return out
    for t in terms.unbind(0):  # one op for all row views
        out += t
    return out


def _cpu_fast(t: torch.Tensor) -> bool:
    """Whether ``t`` may take the CPU-only in-order sums (embedding_bag / index_add_).

    :data:`CPU_FAST_SUMS` exists so that the tests run the other devices' explicit loop on CPU
    tensors too: CI has no GPU, and that loop is what CUDA runs.
    """
    return CPU_FAST_SUMS and t.device.type == "cpu" and t.is_contiguous()


#: Off: every device takes the explicit in-order loop (see :func:`_cpu_fast`).
CPU_FAST_SUMS = True


def seq_sum_slots(terms: torch.Tensor, slots: tuple[int, ...]) -> torch.Tensor:
    """:func:`seq_sum` of ``terms[:, s]`` for each ``s`` in ``slots``, as ``(len(slots), R)``.

    ``terms`` is ``(P, K, R)``. On CPU (contiguous float32) this is one ``embedding_bag`` over
    the whole buffer whose index list picks only the rows of the wanted slots (same arithmetic
    as :func:`seq_sum`), so a caller can sum part of a buffer now and reuse the rest, with no
    copy.
    """
    if _cpu_fast(terms) and terms.dtype == torch.float32:
        bags = _bags_for(terms.shape[2])
        if bags:
            return _bag_sum(terms, slots, bags)
    return torch.stack([seq_sum(terms[:, s]) for s in slots])


def _fix_rows(out: torch.Tensor, need: torch.Tensor, x: torch.Tensor, dim: int,
              exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Recompute ``out`` with the slow ``exact(x_subset)`` where ``need`` is set (usually
    nowhere: only ties decide). ``dim`` is the reduced dim of ``x`` (0 or 1)."""
    idx = need.nonzero().squeeze(1)
    if idx.numel():
        sub = x.index_select(1 - dim, idx)
        out = out.clone()
        out[idx] = exact(sub)
    return out


def first_abs_max(x: torch.Tensor, dim: int,
                  nan_never_wins: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` scan from ``amax = max = 0``
    along ``dim`` (0 or 1 of a 2-D tensor).

    Returns ``(amax, max)``: the largest magnitude and the first element attaining it, with sign;
    ``max`` is ``+0.0`` when every element is zero. The sign is known from plain max/min
    reductions unless both ``+amax`` and ``-amax`` occur; only those groups need the (much
    slower) first-index search.

    The reductions propagate NaN; with ``nan_never_wins`` a tensor holding a NaN is scanned in
    order instead, where (as in C) a NaN never wins the comparison. Without NaN both agree.
    """
    if nan_never_wins and bool(torch.isnan(x).any()):
        return _scan_abs_max(x if dim == 0 else x.t())
    amax = x.abs().amax(dim=dim)
    has_pos = x.amax(dim=dim) == amax
    has_neg = x.amin(dim=dim) == -amax
    mx = torch.where(has_pos, amax, -amax)
    mx = torch.where(amax > 0, mx, 0.0)

    def exact(sub: torch.Tensor) -> torch.Tensor:
        i = sub.abs().argmax(dim=dim, keepdim=True)  # argmax returns the first of equal maxima
        return torch.gather(sub, dim, i).squeeze(dim)

    return amax, _fix_rows(mx, has_pos & has_neg & (amax > 0), x, dim, exact)


def _scan_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`first_abs_max` over dim 0 as the literal in-order scan (exact with NaN)."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for v in x.unbind(0):
        av = v.abs()
        take = av > amax
        amax = torch.where(take, av, amax)
        mx = torch.where(take, v, mx)
    return amax, mx


def first_extreme(x: torch.Tensor, dim: int, largest: bool) -> torch.Tensor:
    """The first element equal to the minimum (or maximum) along ``dim`` (0 or 1 of a 2-D tensor).

    A strict-comparison scan keeps the first of equal values. That matters only for the sign of
    a zero extreme (``-0.0 < 0.0`` is false), and the sign of ``min`` is stored in Q4_1/Q5_1
    blocks; groups whose extreme is zero take the first-index search.
    """
    ext = x.amax(dim=dim) if largest else x.amin(dim=dim)

    def exact(sub: torch.Tensor) -> torch.Tensor:
        i = sub.argmax(dim=dim, keepdim=True) if largest else sub.argmin(dim=dim, keepdim=True)
        return torch.gather(sub, dim, i).squeeze(dim)

    return _fix_rows(ext, ext == 0, x, dim, exact)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(n, 32k)`` integer codes -> ``(n, 16k)`` bytes; byte j of each 32-group holds code j in
    its low nibble and code j+16 in its high nibble (only the low 8 bits are kept, like C's
    ``uint8_t`` store)."""
    n = q.shape[0]
    g = q.to(torch.int32).reshape(n, -1, 2, 16)
    return ((g[:, :, 0] | (g[:, :, 1] << 4)) & 0xFF).to(torch.uint8).reshape(n, -1)


_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def high_bit_bytes(q: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` 5-bit codes -> the little-endian u32 ``qh`` (bit j = bit 4 of code j) as 4 bytes.

    Each byte is a dot product of 8 bits with powers of two: exact in float32 (sums <= 255), and a
    matrix-vector product is the fastest way torch has to do it.
    """
    w = _BIT_WEIGHTS.get(q.device)
    if w is None:
        w = _BIT_WEIGHTS[q.device] = 2.0 ** torch.arange(8, dtype=torch.float32, device=q.device)
    bits = ((q.to(torch.int32) >> 4) & 1).to(torch.float32).reshape(-1, 8)
    return (bits @ w).to(torch.uint8).reshape(q.shape[0], 4)
