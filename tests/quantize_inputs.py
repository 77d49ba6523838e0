"""Adversarial float rows and importance matrices for the quantizer tests.

Real weights are Gaussian-like, but "byte-identical to ggml for any finite input" has to hold where
ggml's arithmetic misbehaves too: subnormal blocks (scales whose reciprocal overflows), ranges that
overflow ``max - min``, all-zero and constant blocks, signed zeros, ties in magnitude.
"""

from __future__ import annotations

import numpy as np

#: Input families drawn by :func:`float_rows`.
ROW_KINDS = ("normal", "wide", "extreme", "ints", "tiny", "constant")
#: Importance-matrix families drawn by :func:`imatrix_row`.
IMATRIX_KINDS = ("uniform", "sparse", "wide")


def float_rows(seed: int, rows: int, cols: int, kind: str) -> np.ndarray:
    """``(rows, cols)`` finite float32 values of the family ``kind`` (see :data:`ROW_KINDS`)."""
    rng = np.random.default_rng(seed)
    shape = (rows, cols)
    if kind == "normal":
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, (rows, 1))
    elif kind == "wide":  # every element its own binade
        x = rng.standard_normal(shape) * np.exp2(rng.integers(-60, 60, shape))
    elif kind == "extreme":  # the whole float32 range, subnormals and near-overflow included
        x = rng.standard_normal(shape) * np.exp2(rng.integers(-150, 128, shape).astype(np.float64))
        x[rng.random(shape) < 0.02] = np.float32(3.4028235e38) * rng.choice([-1, 1])
    elif kind == "ints":  # ties in magnitude, zeros of both signs
        x = rng.integers(-4, 5, shape).astype(np.float64) * 10.0 ** rng.integers(-3, 3, (rows, 1))
        x[rng.random(shape) < 0.3] = -0.0
    elif kind == "tiny":  # around the subnormal range
        exponents = rng.integers(-149, -110, (rows, 1)).astype(np.float64)
        x = rng.standard_normal(shape) * np.exp2(exponents)
    elif kind == "constant":  # constant 32-element groups, some zero
        v = rng.standard_normal((rows, cols // 32, 1)) * (rng.random((rows, cols // 32, 1)) < 0.7)
        x = np.broadcast_to(v, (rows, cols // 32, 32)).reshape(shape)
    else:
        raise ValueError(kind)
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    return np.clip(x, -np.float32(3.4028235e38), np.float32(3.4028235e38))


def imatrix_row(seed: int, cols: int, kind: str) -> np.ndarray:
    """A non-negative finite float32 importance vector of the family ``kind``."""
    rng = np.random.default_rng(seed ^ 0x5EED)
    if kind == "uniform":
        w = rng.random(cols)
    elif kind == "sparse":  # many unimportant positions: ties between candidate scales
        w = rng.random(cols) * (rng.random(cols) < 0.5)
    elif kind == "wide":
        w = rng.random(cols) * np.exp2(rng.integers(-40, 40, cols).astype(np.float64))
    else:
        raise ValueError(kind)
    return w.astype(np.float32)
