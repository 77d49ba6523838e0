"""TQ1_0 and TQ2_0 dequantization: bit-exact with ggml.

Blocks are uniformly random bytes with a finite f16 scale (every byte pattern decodes; TQ1_0
bytes above 242 never come out of the quantizer but ggml still decodes them, and so do we), plus
hand-picked extreme scales. gguf-py 0.19.0's numpy decoder agrees bit for bit with ggml on both.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from dequant_checks import assert_same_bits
from dequant_checks import decode_f32 as ours
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import finite_blocks

from ggufvideo.quants import dequantize, get_quant_type

TYPES = [T.TQ1_0, T.TQ2_0]
IDS = [t.name for t in TYPES]

SPECIAL_SCALES = [0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.097555e-05, 1.0]


def ternary_blocks(qtype: T, n_blocks: int, seed: int, scale: float | None) -> np.ndarray:
    """Random ``qtype`` blocks with finite scales; all of them ``scale`` when it is given."""
    raw = finite_blocks(qtype, n_blocks, seed)
    if scale is not None:
        raw[:, -2:] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)  # d is last
    return raw


def ternary_block_arrays(qtype: T):
    """Strategy: 1-16 random blocks of ``qtype``, half the time with a special scale."""
    return st.builds(ternary_blocks, st.just(qtype), st.integers(1, 16), st.integers(0, 2**32 - 1),
                     st.one_of(st.none(), st.sampled_from(SPECIAL_SCALES)))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ternary_dequantize_matches_ggml_reference(oracle, qtype, data):
    raw = data.draw(ternary_block_arrays(qtype))
    assert_same_bits(ours(qtype, raw), oracle.dequantize(raw, qtype), f"{qtype.name} vs ggml")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ternary_dequantize_matches_gguf_py(qtype, data):
    raw = data.draw(ternary_block_arrays(qtype))
    want = gguf.quants.dequantize(raw, qtype)
    assert_same_bits(ours(qtype, raw), want, f"{qtype.name} vs gguf-py")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_ternary_every_byte_value_matches_ggml_reference(oracle, qtype):
    # Each byte value in every position of the block, so every trit/2-bit code at every element.
    raw = ternary_blocks(qtype, 256, 3, 1.5)
    raw[:, :-2] = np.arange(256, dtype=np.uint8)[:, None]
    assert_same_bits(ours(qtype, raw), oracle.dequantize(raw, qtype), f"{qtype.name} all bytes")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_ternary_half_precision_is_float32_rounded_once(qtype, dtype, data):
    raw = data.draw(ternary_block_arrays(qtype))
    rows = torch.from_numpy(raw.reshape(1, -1))
    exact = dequantize(rows, qtype)
    assert_same_bits(exact.numpy().reshape(-1), ours(qtype, raw).reshape(-1), f"{qtype.name} rows")
    got = dequantize(rows, qtype, dtype=dtype)
    assert got.dtype == dtype and got.shape == exact.shape
    assert torch.equal(got.view(torch.int16), exact.to(dtype).view(torch.int16))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_ternary_decodes_ggml_quantized_weights_like_ggml(oracle, qtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 512)) * rng.uniform(1e-3, 10)).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0.0  # ternary weights: plenty of exact zeros
    q = oracle.quantize(x, qtype)
    want = oracle.dequantize(q, qtype)
    got = dequantize(torch.from_numpy(q), qtype).numpy()
    assert_same_bits(got, want, f"{qtype.name} round trip")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_ternary_dequantize_on_cuda_matches_cpu(qtype):
    raw = ternary_blocks(qtype, 4096, 7, None)
    gpu = get_quant_type(qtype).dequantize_blocks(torch.from_numpy(raw).cuda())
    assert gpu.dtype == torch.float32
    assert_same_bits(gpu.cpu().numpy(), ours(qtype, raw), f"{qtype.name} cuda vs cpu")
