"""Oracle-free checks of every quantizer: the reconstruction error is bounded by the type's step.

The oracle tests compare our bytes with ggml's; these need nothing but ggufvideo, so a broken
quantizer fails here even where pywhispercpp is not installed.

For a block of ``n`` values with largest magnitude ``amax``, each type's step is ``amax / L``: the
spacing of its levels at the block's scale. Rounding to the nearest level costs at most half a step;
each bound below adds what the format adds on top (fp16 scales, clipped ends, quantized sub-block
scales), so a correct quantizer stays inside and a broken one (wrong level, scale, sign, block
order) does not: every ``k / L`` is below 1, so even an all-zero output fails the bound.
"""

from __future__ import annotations

import pytest
import torch

import ggufvideo
from ggufvideo.policy import quantizable_type_names
from ggufvideo.quants import get_quant_type

_F16_SCALE = 2.0 ** -11  # relative rounding of an fp16 scale (normal range)

#: type -> (L: levels per amax, k: the largest error allowed, in steps amax / L).
BOUNDS: dict[str, tuple[float, float]] = {
    # d = amax/127, q in [-127, 127]: half a step, plus the fp16 rounding of d times |q| <= 127.
    "Q8_0": (127, 0.5 + 127 * _F16_SCALE + 0.01),
    # d = -max/8 (or /16), q in [-8, 7] ([-16, 15]): the end opposite max is clipped at 7d (15d),
    # up to one full step away, plus the scale's rounding.
    "Q4_0": (8, 1.0 + 8 * _F16_SCALE + 0.01),
    "Q5_0": (16, 1.0 + 16 * _F16_SCALE + 0.01),
    # min + d*q over [min, max], range <= 2 amax, 15 (31) steps: half a step plus d and m rounding.
    "Q4_1": (7.5, 0.5 + 0.05),
    "Q5_1": (15.5, 0.5 + 0.05),
    # K-quants: 256-value super-blocks whose sub-block scales (and mins) are themselves quantized
    # (4-bit for Q2_K, 6-bit for Q3_K/Q4_K/Q5_K, 8-bit for Q6_K) against the super-block's: half a
    # step of rounding plus up to half a step from the quantized sub-block scale.
    "Q2_K": (1.5, 1.0),   # 2 bits with a min: 3 steps over a range <= 2 amax
    "Q3_K": (4, 1.0),     # 3 bits signed: q in [-4, 3]
    "Q4_K": (7.5, 1.0),   # 4 bits with a min: 15 steps over a range <= 2 amax
    "Q5_K": (15.5, 1.0),  # 5 bits with a min
    "Q6_K": (32, 1.0),    # 6 bits signed: q in [-32, 31]
    # IQ4: a fixed non-uniform grid of 16 values in [-127, 113] * d, d ~ amax / 127; its widest gap
    # is 24 (89 -> 113), so one step is 24 d and rounding costs half of it; the scale search may
    # pick a d a little off amax / 127 (and IQ4_XS quantizes the sub-block scales): 3/4 of a step.
    "IQ4_NL": (127 / 24, 0.75),
    "IQ4_XS": (127 / 24, 0.75),
}
#: Unquantized float types: the largest error relative to each value (round to nearest), and the
#: largest absolute error (half the spacing of fp16's subnormals, below 2**-14).
RELATIVE: dict[str, float] = {"F32": 0.0, "F64": 0.0, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}
ABSOLUTE: dict[str, float] = {"F16": 2.0 ** -25}


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(32, 512, generator=g)
    outliers = gauss.clone()
    outliers[:, ::97] *= 20
    return {
        "gaussian": gauss,
        "positive offset": torch.rand(32, 512, generator=g) * 3 + 1,
        "outliers": outliers,
        # rows from 0.1 to 1000 times as large (scales stay in fp16's normal range)
        "row scales": gauss * torch.logspace(-1, 3, 32)[:, None],
        "constant rows": torch.full((4, 512), 0.37),
        "one value per block": torch.zeros(4, 512).index_fill_(1, torch.arange(0, 512, 32), 2.5),
    }


def test_every_quantizable_type_has_a_bound():
    names = set(quantizable_type_names())
    assert names == set(BOUNDS) | set(RELATIVE), names ^ (set(BOUNDS) | set(RELATIVE))
    for name, (levels, k) in BOUNDS.items():
        assert k / levels < 1, f"{name}: the bound would let an all-zero output pass"


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_block_error_within_the_types_step(name):
    qt = get_quant_type(name)
    levels, k = BOUNDS[name]
    for kind, x in _inputs(0).items():
        blocks = ggufvideo.quantize(x, name)
        assert blocks.dtype == torch.uint8
        assert blocks.shape == (x.shape[0], qt.row_bytes(x.shape[1]))
        y = ggufvideo.dequantize(blocks, name, dtype=torch.float32)
        assert y.shape == x.shape and bool(torch.isfinite(y).all())
        xb, yb = x.reshape(-1, qt.block_size), y.reshape(-1, qt.block_size)
        amax = xb.abs().amax(dim=1)
        err = (yb - xb).abs().amax(dim=1)
        bound = k * amax / levels + 1e-6 * amax
        bad = torch.nonzero(err > bound).flatten()
        assert bad.numel() == 0, (
            f"{name}, {kind} input: block {int(bad[0])} error {float(err[bad[0]]):.4g} > bound "
            f"{float(bound[bad[0]]):.4g} (amax {float(amax[bad[0]]):.4g}, "
            f"{float(err[bad[0]] / (amax[bad[0]] / levels)):.3f} steps, allowed {k:.3f})")


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_zero_blocks_stay_zero(name):
    qt = get_quant_type(name)
    x = torch.zeros(2, qt.block_size * 2)
    y = ggufvideo.dequantize(ggufvideo.quantize(x, name), name, dtype=torch.float32)
    assert torch.equal(y, x)


@pytest.mark.parametrize("name", sorted(RELATIVE))
def test_float_types_round_each_value_once(name):
    x = _inputs(1)["row scales"]
    qt = get_quant_type(name)
    y = ggufvideo.dequantize(ggufvideo.quantize(x, name), name, dtype=torch.float64)
    x64 = x.double()
    bound = RELATIVE[name] * x64.abs() + ABSOLUTE.get(name, 0.0)
    assert bool(((y - x64).abs() <= bound).all()), name
    if qt.torch_dtype is not None and RELATIVE[name]:
        # round to nearest, as torch's own cast does
        assert torch.equal(y, x.to(qt.torch_dtype).double())
