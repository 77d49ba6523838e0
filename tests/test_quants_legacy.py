"""Spec of the 32-element block dequantizers: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL.

Each type gets the tests of :func:`dequant_checks.type_tests`: bit-identical to ggml's
``dequantize_row_*`` (the oracle) and to gguf-py for random blocks, fp16/bf16 output equal to the
float32 result rounded once, leading dims kept, chunking invisible, partial blocks rejected.
"""

from __future__ import annotations

import dequant_checks

LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")

for _name in LEGACY_TYPES:
    globals().update(dequant_checks.type_tests(_name))
