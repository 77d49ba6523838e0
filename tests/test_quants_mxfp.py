"""MXFP4 dequantization: bit-exact with ggml, for every E8M0 scale byte.

ggml turns the scale byte e into ``2**(e - 128)`` by building float bits (e = 0, 1 give
subnormals; e = 255, E8M0's NaN code, is just 2**127), so the scale is always finite. The
products ``kvalue * scale`` (|kvalue| <= 12) are exact powers-of-two multiples except where they
overflow: for e >= 253 the largest codes give ±inf in ggml. No input gives NaN. So a plain
bit-for-bit comparison (inf == inf) covers every e, and every e is tested exhaustively.
gguf-py 0.19.0's numpy decoder agrees bit for bit with ggml, infinities included.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from dequant_checks import assert_same_bits
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import block_arrays

from ggufvideo.quants import dequantize, get_quant_type
from ggufvideo.quants.mxfp import e8m0_to_fp32_half

MXFP4 = get_quant_type(T.MXFP4)


def ours(raw: np.ndarray) -> np.ndarray:
    """Our float32 decode of ``(n_blocks, 17)`` blocks, as ``(n_blocks, 32)``."""
    return MXFP4.dequantize_blocks(torch.from_numpy(raw)).numpy()


def every_scale_and_code() -> np.ndarray:
    """4096 blocks: each of the 256 scale bytes with all 256 ``qs`` byte values (16 blocks each),
    so every (e, low code, high code) combination occurs."""
    e = np.repeat(np.arange(256, dtype=np.uint8), 16)
    qs = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 1))
    return np.concatenate([e[:, None], qs], axis=1)


def test_mxfp4_half_scale_is_two_to_the_e_minus_128():
    e = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = e8m0_to_fp32_half(e)
    assert got.dtype == torch.float32
    want = torch.tensor([math.ldexp(1.0, k - 128) for k in range(256)], dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.isfinite(got).all()


def test_mxfp4_every_scale_and_code_matches_ggml_reference(oracle):
    raw = every_scale_and_code()
    want = oracle.dequantize(raw, T.MXFP4)
    assert not np.isnan(want).any()
    assert np.isinf(want).any()  # the overflowing top exponents are really exercised
    assert_same_bits(ours(raw), want, "MXFP4 vs ggml, all e")


def test_mxfp4_every_scale_and_code_matches_gguf_py():
    raw = every_scale_and_code()
    with np.errstate(over="ignore"):
        want = gguf.quants.dequantize(raw, T.MXFP4)
    assert_same_bits(ours(raw), want, "MXFP4 vs gguf-py, all e")


def test_mxfp4_values_are_e2m1_times_power_of_two():
    # Independent of ggml: code c decodes to E2M1(c) * 2**(e - 127) (ggml's doubled table with a
    # halved scale is the same number), overflowing to inf past float32's range. E2M1's -0 (code 8)
    # decodes to +0: ggml's table holds integers, which have no negative zero.
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    e2m1 = e2m1 + [0.0] + [-v for v in e2m1[1:]]
    raw = every_scale_and_code()
    got = ours(raw)
    for i in range(0, raw.shape[0], 97):
        e = int(raw[i, 0])
        codes = np.concatenate([raw[i, 1:] & 0xF, raw[i, 1:] >> 4])
        want = np.array([e2m1[c] * 2.0 ** (e - 127) for c in codes], dtype=np.float64)
        with np.errstate(over="ignore"):
            want32 = want.astype(np.float32)
        assert_same_bits(got[i], want32, f"block with e={e}")


@settings(max_examples=60, deadline=None)
@given(raw=block_arrays(T.MXFP4, max_blocks=64))
def test_mxfp4_dequantize_matches_ggml_reference(oracle, raw):
    assert_same_bits(ours(raw), oracle.dequantize(raw, T.MXFP4), "MXFP4 vs ggml")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@settings(max_examples=30, deadline=None)
@given(raw=block_arrays(T.MXFP4, max_blocks=64))
def test_mxfp4_half_precision_is_float32_rounded_once(dtype, raw):
    rows = torch.from_numpy(raw.reshape(1, -1))
    exact = dequantize(rows, T.MXFP4)
    assert_same_bits(exact.numpy().reshape(-1), ours(raw).reshape(-1), "MXFP4 rows")
    got = dequantize(rows, T.MXFP4, dtype=dtype)
    assert got.dtype == dtype and got.shape == exact.shape
    assert torch.equal(got.view(torch.int16), exact.to(dtype).view(torch.int16))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_scale=st.floats(-30, 30))
def test_mxfp4_decodes_ggml_quantized_weights_like_ggml(oracle, seed, log_scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 256)) * 2.0**log_scale).astype(np.float32)
    q = oracle.quantize(x, T.MXFP4)
    want = oracle.dequantize(q, T.MXFP4)
    got = dequantize(torch.from_numpy(q), T.MXFP4).numpy()
    assert_same_bits(got, want, "MXFP4 round trip")


@pytest.mark.gpu
def test_mxfp4_dequantize_on_cuda_matches_cpu():
    # Includes the subnormal scales (e = 0, 1): CUDA must not flush them to zero.
    raw = every_scale_and_code()
    gpu = MXFP4.dequantize_blocks(torch.from_numpy(raw).cuda())
    assert gpu.dtype == torch.float32
    assert_same_bits(gpu.cpu().numpy(), ours(raw), "MXFP4 cuda vs cpu")
