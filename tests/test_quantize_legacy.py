"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 encoders: byte-identical to ggml and to gguf-py's numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st
from quantize_inputs import IMATRIX_KINDS, ROW_KINDS, float_rows, imatrix_row

from ggufvideo.quants import _quantize_common, get_quant_type, quantize

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]

rows_st = st.integers(1, 3)
cols_st = st.sampled_from([32, 64, 96, 256])
seed_st = st.integers(0, 2**32 - 1)
kind_st = st.sampled_from(ROW_KINDS)


def _ours(x: np.ndarray, qtype: T, im: np.ndarray | None = None) -> np.ndarray:
    return quantize(torch.from_numpy(x), qtype,
                    imatrix=None if im is None else torch.from_numpy(im)).numpy()


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@settings(max_examples=60, deadline=None)
@given(seed=seed_st, rows=rows_st, cols=cols_st, kind=kind_st)
def test_legacy_matches_ggml_reference(oracle, qtype, seed, rows, cols, kind):
    x = float_rows(seed, rows, cols, kind)
    np.testing.assert_array_equal(_ours(x, qtype), oracle.quantize(x, qtype))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@settings(max_examples=40, deadline=None)
@given(seed=seed_st, rows=rows_st, cols=cols_st, kind=kind_st,
       im_kind=st.sampled_from(IMATRIX_KINDS))
def test_legacy_with_imatrix_matches_ggml_reference(oracle, qtype, seed, rows, cols, kind, im_kind):
    x = float_rows(seed, rows, cols, kind)
    im = imatrix_row(seed, cols, im_kind)
    np.testing.assert_array_equal(_ours(x, qtype, im), oracle.quantize(x, qtype, im))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@settings(max_examples=30, deadline=None)
@given(seed=seed_st, rows=rows_st, cols=cols_st,
       kind=st.sampled_from([k for k in ROW_KINDS if k != "constant"]))
def test_legacy_matches_gguf_py_numpy(qtype, seed, rows, cols, kind):
    # "constant" rows hold all-zero blocks, where gguf-py differs from ggml (next test).
    x = float_rows(seed, rows, cols, kind)
    with np.errstate(all="ignore"):  # gguf-py divides by zero / overflows on extreme blocks
        ref = gguf_quants.quantize(x, qtype)
    np.testing.assert_array_equal(_ours(x, qtype), ref)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0], ids=lambda t: t.name)
def test_all_zero_block_scale_is_negative_zero_like_ggml(oracle, qtype):
    # ggml computes d = max / -8 with max = +0.0, i.e. -0.0 (fp16 0x8000); gguf-py writes +0.0.
    x = np.zeros((1, 32), dtype=np.float32)
    ours = _ours(x, qtype)
    assert ours[0, :2].tobytes() == b"\x00\x80"
    np.testing.assert_array_equal(ours, oracle.quantize(x, qtype))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_weighted_legacy_uses_the_whole_row_mean_square(oracle, qtype):
    # ggml scales the importance by the mean square of the entire row, so a block's bytes depend
    # on the other blocks of its row; quantize() must hand the encoder whole rows.
    x = float_rows(7, 2, 256, "normal")
    x[:, 128:] *= 100
    im = imatrix_row(7, 256, "uniform")
    np.testing.assert_array_equal(_ours(x, qtype, im), oracle.quantize(x, qtype, im))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_block_encoder_takes_each_block_as_a_row(oracle, qtype):
    x = float_rows(3, 4, 32, "normal")
    im = imatrix_row(3, 32, "uniform")
    blocks = get_quant_type(qtype).quantize_blocks(
        torch.from_numpy(x), torch.from_numpy(np.tile(im, (4, 1))))
    np.testing.assert_array_equal(blocks.numpy(), oracle.quantize(x, qtype, im))


def test_q8_0_ignores_the_imatrix_like_ggml():
    x = torch.from_numpy(float_rows(5, 2, 64, "normal"))
    im = torch.from_numpy(imatrix_row(5, 64, "wide"))
    assert torch.equal(quantize(x, "Q8_0", imatrix=im), quantize(x, "Q8_0"))


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_special_blocks_match_ggml_reference(oracle, qtype):
    # All-zero, all -0.0, constant, subnormal, +-FLT_MAX and magnitude ties, with and without
    # an imatrix.
    big = np.float32(3.4028235e38)
    rows = np.zeros((7, 32), dtype=np.float32)
    rows[1] = -0.0
    rows[2] = 1.5
    rows[3, ::3] = 1e-40
    rows[4, 0], rows[4, 1] = big, -big
    rows[5, :4] = [2.0, -2.0, 2.0, -1.0]
    rows[6] = -3.0
    x = rows.reshape(1, -1)
    im = np.ones(x.shape[1], dtype=np.float32)
    np.testing.assert_array_equal(_ours(x, qtype), oracle.quantize(x, qtype))
    np.testing.assert_array_equal(_ours(x, qtype, im), oracle.quantize(x, qtype, im))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_registry_passes_the_row_to_the_weighted_legacy_encoders(qtype):
    # The weighted encoders depend on the whole row (its mean square): the registry's
    # quantize_blocks carries blocks_per_row to them, and it changes their bytes.
    x = torch.from_numpy(float_rows(7, 1, 256, "normal"))
    x[:, 128:] *= 100
    w = torch.from_numpy(imatrix_row(7, 256, "uniform")).reshape(-1, 32)
    qt = get_quant_type(qtype)
    blocks = x.reshape(-1, 32)
    assert not torch.equal(qt.quantize_blocks(blocks, w, blocks_per_row=8),
                           qt.quantize_blocks(blocks, w))


def test_nearest_int_of_any_nan_is_zero_like_ggml_on_x86():
    # x86 makes every NaN of ggml's arithmetic the default NaN, whose mantissa bits give 0 in the
    # magic-number trick; CUDA's NaNs carry other payloads, so the result must not read them.
    bits = torch.tensor([0x7FC00000, -0x400000, 0x7FFFFFFF, 0x7F800001], dtype=torch.int32)
    got = _quantize_common.nearest_int(bits.view(torch.float32))
    assert got.tolist() == [0, 0, 0, 0]
    ref = torch.tensor([0.5, 1.5, -2.5, 4194303.0, float("inf")])
    assert _quantize_common.nearest_int(ref).tolist() == [0, 2, -2, 4194303, -0x400000]


def test_nan_scale_is_stored_as_ggml_stores_it_on_x86():
    # ggml converts x86's default NaN (sign set) to fp16 0xFE00, whatever NaN the device made.
    bits = torch.tensor([0x7FFFFFFF, -0x400000, 0x3F800000], dtype=torch.int32)
    h = _quantize_common.to_fp16(bits.view(torch.float32)).view(torch.int16)
    assert [v & 0xFFFF for v in h.tolist()] == [0xFE00, 0xFE00, 0x3C00]
