"""Spec of the 256-element super-block dequantizers: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS.

Each type gets the tests of :func:`dequant_checks.type_tests` (see test_quants_legacy.py), plus
the extremes of the packed scale fields, where an off-by-one in the bit unpacking would show.
"""

from __future__ import annotations

import dequant_checks
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from strategies import finite_blocks

from ggufvideo.quants import get_quant_type

KQUANT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")

for _name in KQUANT_TYPES:
    globals().update(dequant_checks.type_tests(_name))

# Fields holding packed scales/mins/high bits, set to all-ones and to all-zeros below.
_SCALE_FIELDS = {
    "Q2_K": ("scales",), "Q3_K": ("scales", "hmask"), "Q4_K": ("scales",),
    "Q5_K": ("scales", "qh"), "Q6_K": ("scales", "qh"), "IQ4_XS": ("scales_h", "scales_l"),
}


@pytest.mark.parametrize("name", KQUANT_TYPES)
@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_kquant_scale_fields_at_their_extremes_match_ggml_reference(oracle, name: str,
                                                                     fill: int) -> None:
    qtype = GGMLQuantizationType[name]
    qt = get_quant_type(qtype)
    raw = finite_blocks(qtype, 8, seed=fill)
    for field in _SCALE_FIELDS[name]:
        f = qt.layout[field]
        raw[:, f.offset:f.offset + f.nbytes] = fill
    got = qt.dequantize_blocks(torch.from_numpy(raw))
    want = oracle.dequantize(raw, qtype)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
