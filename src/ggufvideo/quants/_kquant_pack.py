"""K-quant block packing: the final re-quantization against the chosen scales, and the bit
packing of codes and 6-bit scales/mins into ggml's block bytes (Q2_K...Q6_K).

The byte layouts themselves are declared once in :mod:`.kquants`; these helpers produce the fields
it packs. The searches that choose the scales are :mod:`._kquant_search`.
"""

from __future__ import annotations

import torch

from ._kquant_search import (
    _F32,
    _NINT_SAFE,
    QK_K,
    _block_major,
    _keep_where,
    _round_clamp,
)
from ._quantize_common import div


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
