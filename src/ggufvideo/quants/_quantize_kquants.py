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

The layouts come from :mod:`.kquants` (declared once there). This module holds the entry points,
the chunking and each type's block assembly; the scale searches are :mod:`._kquant_search` (and
:mod:`._kquant_search_q3` for Q3_K's), the final re-quantization and bit packing
:mod:`._kquant_pack`.
"""

from __future__ import annotations

from functools import partial

import torch

from ..errors import QuantizationError
from ._kquant_pack import (
    _pack_crumbs,
    _pack_nibbles64,
    _pack_q3_scales,
    _pack_scale_min_k4,
    _requant_affine,
    _requant_symmetric,
    _unpack_scale_min_k4,
)
from ._kquant_search import (
    _F32,
    QK_K,
    _make_qkx,
    _make_qp_pair,
    _make_qx,
    _pos_major,
    _running_max_pos,
    _Scratch,
    _sub_scales,
    _to_fp16,
)
from ._kquant_search_q3 import _make_q3
from ._quantize_common import (
    GROUP_MAX_EPS,
    div,
    first_abs_max,
    nearest_int,
    seq_sum,
    sqrt,
)

__all__ = ["quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]

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
