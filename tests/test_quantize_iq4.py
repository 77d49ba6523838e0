"""IQ4_NL and IQ4_XS encoders: byte-identical to ggml, and the codebook search they share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from quantize_inputs import IMATRIX_KINDS, ROW_KINDS, float_rows, imatrix_row

from ggufvideo.quants import _quantize_iq4, get_quant_type, quantize

seed_st = st.integers(0, 2**32 - 1)
kind_st = st.sampled_from(ROW_KINDS)
im_kind_st = st.sampled_from((None,) + IMATRIX_KINDS)


def _ours(x: np.ndarray, qtype: T, im: np.ndarray | None) -> np.ndarray:
    return quantize(torch.from_numpy(x), qtype,
                    imatrix=None if im is None else torch.from_numpy(im)).numpy()


@settings(max_examples=60, deadline=None)
@given(seed=seed_st, rows=st.integers(1, 3), cols=st.sampled_from([32, 64, 256]), kind=kind_st,
       im_kind=im_kind_st)
def test_iq4_nl_matches_ggml_reference(oracle, seed, rows, cols, kind, im_kind):
    x = float_rows(seed, rows, cols, kind)
    im = None if im_kind is None else imatrix_row(seed, cols, im_kind)
    np.testing.assert_array_equal(_ours(x, T.IQ4_NL, im), oracle.quantize(x, T.IQ4_NL, im))


@settings(max_examples=40, deadline=None)
@given(seed=seed_st, rows=st.integers(1, 2), cols=st.sampled_from([256, 512]), kind=kind_st,
       im_kind=im_kind_st)
def test_iq4_xs_matches_ggml_reference(oracle, seed, rows, cols, kind, im_kind):
    x = float_rows(seed, rows, cols, kind)
    im = None if im_kind is None else imatrix_row(seed, cols, im_kind)
    np.testing.assert_array_equal(_ours(x, T.IQ4_XS, im), oracle.quantize(x, T.IQ4_XS, im))


def test_iq4_xs_block_encoder_is_registered():
    x = torch.from_numpy(float_rows(1, 2, 256, "normal"))
    blocks = get_quant_type(T.IQ4_XS).quantize_blocks(x, None)
    assert blocks.shape == (2, 136) and blocks.dtype == torch.uint8
    assert torch.equal(blocks, quantize(x, "IQ4_XS"))


def _ggml_best_index(v: np.float32) -> int:
    """ggml's best_index_int8 over the IQ4 codebook, step by step in float32."""
    val = [np.float32(k) for k in _quantize_iq4.KVALUES]
    if v <= val[0]:
        return 0
    if v >= val[-1]:
        return len(val) - 1
    ml, mu = 0, len(val) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(v - val[mu - 1]) < np.float32(val[mu] - v) else mu


def test_best_index_matches_ggml_near_every_decision_point():
    kv = np.array(_quantize_iq4.KVALUES, dtype=np.float32)
    mids = (kv[:-1].astype(np.float64) + kv[1:]) / 2
    probes = [np.float32(np.nan), np.float32(np.inf), np.float32(-np.inf), np.float32(0.0),
              np.float32(-0.0), np.float32(1e-45), np.float32(3e38), np.float32(-3e38)]
    for centre in np.concatenate([kv, mids]).astype(np.float32):
        v = centre
        for _ in range(64):  # 64 floats either side of every code value and midpoint
            v = np.nextafter(v, np.float32(np.inf))
            probes.append(v)
        v = centre
        for _ in range(64):
            v = np.nextafter(v, np.float32(-np.inf))
            probes.append(v)
        probes.append(centre)
    rng = np.random.default_rng(0)
    probes.extend(rng.uniform(-140, 130, 5000).astype(np.float32))
    probes = np.array(probes, dtype=np.float32)
    got = _quantize_iq4.best_index(torch.from_numpy(probes)).numpy()
    want = np.array([_ggml_best_index(v) for v in probes])
    np.testing.assert_array_equal(got, want)


def test_decision_thresholds_lie_between_neighbouring_codes():
    kv = _quantize_iq4.KVALUES
    thr = _quantize_iq4._THRESHOLDS
    assert all(kv[i] < thr[i] <= kv[i + 1] for i in range(len(thr)))


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS], ids=lambda t: t.name)
def test_special_blocks_match_ggml_reference(oracle, qtype):
    big = np.float32(3.4028235e38)
    groups = np.zeros((8, 32), dtype=np.float32)
    groups[1] = -0.0
    groups[2] = 1.5
    groups[3, ::3] = 1e-40
    groups[4, 0], groups[4, 1] = big, -big
    groups[5, :4] = [2.0, -2.0, 2.0, -1.0]
    groups[6] = -3.0
    groups[7] = np.linspace(-1e-14, 1e-14, 32)
    x = groups.reshape(1, -1)
    im = np.ones(x.shape[1], dtype=np.float32)
    for w in (None, im):
        np.testing.assert_array_equal(_ours(x, qtype, w), oracle.quantize(x, qtype, w))
