"""IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S dequantization: bit-exact with ggml.

Every bit pattern of the quant bytes is legal, so the blocks are uniformly random bytes with a
finite f16 super-block scale (for IQ1_M, whose scale is spread over the top nibbles of its
``scales`` field, those nibbles are redrawn until the scale is finite), plus hand-picked extreme
scales. gguf-py 0.19.0's numpy decoder agrees bit for bit with ggml on all seven types, so it is a
second reference that needs no oracle.
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

TYPES = [T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S]
IDS = [t.name for t in TYPES]

# Scales that stress the float32 arithmetic: signed zeros, the f16 extremes, subnormals.
SPECIAL_SCALES = [0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.097555e-05, 1.0, -3.140625]


def _set_iq1_m_scale(raw: np.ndarray, bits: np.ndarray) -> None:
    """Store f16 bit patterns ``bits`` (uint16, one per block) as IQ1_M's super-block scale.

    Its 16 bits are the top nibbles of the four little-endian u16 of ``scales`` (bytes 48-55),
    lowest nibble first, i.e. the high nibbles of bytes 49, 51, 53 and 55.
    """
    for k in range(4):
        nib = ((bits >> (4 * k)) & 0xF).astype(np.uint8)
        col = 49 + 2 * k
        raw[:, col] = (raw[:, col] & 0x0F) | (nib << 4)


def _iq1_m_scale_bits(raw: np.ndarray) -> np.ndarray:
    """The f16 bit patterns of IQ1_M's super-block scales, uint16 per block."""
    bits = np.zeros(raw.shape[0], dtype=np.uint16)
    for k in range(4):
        bits |= (raw[:, 49 + 2 * k] >> 4).astype(np.uint16) << (4 * k)
    return bits


def iq_blocks(qtype: T, n_blocks: int, seed: int, scale: float | None) -> np.ndarray:
    """Random ``qtype`` blocks with finite scales; all of them ``scale`` when it is given."""
    raw = finite_blocks(qtype, n_blocks, seed)
    if qtype == T.IQ1_M:
        rng = np.random.default_rng(seed + 1)
        bits = _iq1_m_scale_bits(raw)
        while True:
            bad = ~np.isfinite(bits.view(np.float16))
            if not bad.any():
                break
            bits[bad] = rng.integers(0, 1 << 16, size=int(bad.sum()), dtype=np.uint16)
        if scale is not None:
            bits[:] = np.float16(scale).view(np.uint16)
        _set_iq1_m_scale(raw, bits)
    elif scale is not None:
        raw[:, 0:2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return raw


def iq_block_arrays(qtype: T):
    """Strategy: 1-16 random blocks of ``qtype``, half the time with a special scale."""
    return st.builds(iq_blocks, st.just(qtype), st.integers(1, 16), st.integers(0, 2**32 - 1),
                     st.one_of(st.none(), st.sampled_from(SPECIAL_SCALES)))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_iquant_dequantize_matches_ggml_reference(oracle, qtype, data):
    raw = data.draw(iq_block_arrays(qtype))
    want = oracle.dequantize(raw, qtype)
    assert_same_bits(ours(qtype, raw), want, f"{qtype.name} vs ggml")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_iquant_dequantize_matches_gguf_py(qtype, data):
    raw = data.draw(iq_block_arrays(qtype))
    want = gguf.quants.dequantize(raw, qtype)
    assert_same_bits(ours(qtype, raw), want, f"{qtype.name} vs gguf-py")


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_iquant_half_precision_is_float32_rounded_once(qtype, dtype, data):
    raw = data.draw(iq_block_arrays(qtype))
    rows = torch.from_numpy(raw.reshape(2, -1) if raw.shape[0] % 2 == 0 else raw.reshape(1, -1))
    exact = dequantize(rows, qtype)
    assert exact.dtype == torch.float32
    assert_same_bits(exact.numpy().reshape(-1), ours(qtype, raw).reshape(-1), f"{qtype.name} rows")
    got = dequantize(rows, qtype, dtype=dtype)
    assert got.dtype == dtype and got.shape == exact.shape
    assert torch.equal(got.view(torch.int16), exact.to(dtype).view(torch.int16))


@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), unit_weights=st.booleans())
def test_iquant_decodes_ggml_quantized_weights_like_ggml(oracle, qtype, seed, unit_weights):
    # The blocks a real quantizer writes (with an importance matrix, which IQ1_S/IQ2_XXS/IQ2_XS
    # require), not just random bytes. ggml's first quantization of a type builds its search
    # tables (seconds for IQ1_S and IQ2_S); later ones are fast.
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 512)) * rng.uniform(1e-3, 10)).astype(np.float32)
    imatrix = np.ones(512, np.float32) if unit_weights else rng.uniform(0.01, 4.0, 512).astype(
        np.float32)
    q = oracle.quantize(x, qtype, imatrix)
    qt = get_quant_type(qtype)
    assert q.shape == (3, 512 // qt.block_size * qt.type_size())
    want = oracle.dequantize(q, qtype)
    got = dequantize(torch.from_numpy(q), qtype).numpy()
    assert_same_bits(got, want, f"{qtype.name} round trip")


def test_iquant_sign_codes_have_even_parity():
    # ggml's ksigns_iq2xs (taken from gguf-py): the 7 stored sign bits, plus an 8th that makes the
    # number of minus signs even. The decoders rely on this table being ggml's.
    ks = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, dtype=np.uint8)
    assert ks.shape == (128,)
    assert np.array_equal(ks & 0x7F, np.arange(128))
    assert all(bin(int(v)).count("1") % 2 == 0 for v in ks)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=IDS)
def test_iquant_dequantize_on_cuda_matches_cpu(qtype):
    raw = iq_blocks(qtype, 4096, 7, None)
    cpu = ours(qtype, raw)
    blocks = torch.from_numpy(raw).cuda()
    gpu = get_quant_type(qtype).dequantize_blocks(blocks)
    assert gpu.device == blocks.device and gpu.dtype == torch.float32
    assert_same_bits(gpu.cpu().numpy(), cpu, f"{qtype.name} cuda vs cpu")
