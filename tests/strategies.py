"""Hypothesis strategies shared by the codec tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from ggufvideo.quants import get_quant_type


def finite_blocks(qtype, n_blocks: int, seed: int) -> np.ndarray:
    """``n_blocks`` random blocks of ``qtype`` whose float16 scale fields are finite.

    Bytes are uniformly random (every bit pattern of the quant fields is legal); each f16 field is
    redrawn until finite, so the oracle's output is finite and comparable bit for bit.
    """
    qt = get_quant_type(qtype)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, qt.type_size()), dtype=np.uint8)
    for f in qt.layout.fields:
        if f.dtype != torch.float16:
            continue
        sl = raw[:, f.offset:f.offset + f.nbytes]
        vals = sl.copy().view(np.float16)
        bad = ~np.isfinite(vals)
        while bad.any():
            vals[bad] = rng.integers(0, 1 << 16, size=int(bad.sum()), dtype=np.uint16).view(np.float16)
            bad = ~np.isfinite(vals)
        raw[:, f.offset:f.offset + f.nbytes] = vals.view(np.uint8)
    return raw


def block_arrays(qtype, max_blocks: int = 16):
    """Strategy: ``(n_blocks, type_size)`` uint8 arrays with finite f16 scales."""
    return st.builds(finite_blocks, st.just(qtype), st.integers(1, max_blocks),
                     st.integers(0, 2**32 - 1))
