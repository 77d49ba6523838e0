"""Spec of the 32-element block dequantizers: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Each type gets the tests of :func:`dequant_checks.type_tests`: bit-identical to ggml's
``dequantize_row_*`` (the oracle) and to gguf-py for random blocks, fp16/bf16 output equal to the
float32 result rounded once, leading dims kept, chunking invisible, partial blocks rejected.
"""

from __future__ import annotations

import dequant_checks
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from strategies import finite_blocks

from ggufvideo.quants import dequantize

LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")

for _name in LEGACY_TYPES:
    globals().update(dequant_checks.type_tests(_name))


def test_large_output_is_an_ordinary_writable_tensor() -> None:
    # 8 MB of float32: large enough for the huge-page (numpy-backed) output allocation on CPU.
    qtype = GGMLQuantizationType.Q4_0
    raw = finite_blocks(qtype, 2048 * 32, seed=5).reshape(2048, -1)
    before = raw.copy()
    got = dequantize(torch.from_numpy(raw), qtype)
    assert got.shape == (2048, 1024) and got.dtype == torch.float32 and got.is_contiguous()
    want = gguf_quants.dequantize(raw, qtype)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    got.mul_(2)  # writable, and shares no memory with the input bytes
    assert np.array_equal(raw, before)
