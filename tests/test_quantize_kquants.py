"""K-quant quantization (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) is byte-identical to ggml's.

Every test compares with ``ggml_quantize_chunk`` from ggml's own library (the ``oracle`` fixture,
skipped when absent), both without an importance matrix (ggml's ``*_ref`` searches) and with one
(the weighted ``*_impl`` searches). Inputs mix ordinary blocks with the ones that exercise ggml's
corner cases: all-zero and constant blocks, exact rounding ties, a lone non-zero value,
magnitudes near float32's overflow and deep in the subnormals, and ranges that overflow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggufvideo.errors import QuantizationError
from ggufvideo.quants import get_quant_type

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
N_KINDS = 12


def make_block(kind: int, rng: np.random.Generator) -> np.ndarray:
    """One 256-element float32 block of a given flavour (see the module docstring)."""
    n = 256
    if kind == 0:
        v = rng.standard_normal(n)
    elif kind == 1:
        v = np.zeros(n)
    elif kind == 2:
        v = np.full(n, rng.choice([1.5, -2.0, 1e-20, -3e38, 7.0]))
    elif kind == 3:
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-45, 38)
    elif kind == 4:  # half-integers: exact ties for nearest_int
        v = rng.integers(-8, 8, n) * 0.5
    elif kind == 5:
        v = np.zeros(n)
        lone = rng.standard_normal() * 10.0 ** rng.uniform(-40, 38)
        v[rng.integers(0, n, rng.integers(1, 4))] = lone
    elif kind == 6:  # ranges that overflow float32
        v = rng.choice([-3e38, 3e38, 0.0, 1.0], n)
    elif kind == 7:
        v = np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-10, 10)
    elif kind == 8:
        v = -np.abs(rng.standard_normal(n))
    elif kind == 9:  # every element its own magnitude
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-45, 38, size=n)
    elif kind == 10:
        v = rng.standard_normal(n) + 1000.0
    else:
        v = rng.standard_normal(n) * 1e-38
    with np.errstate(over="ignore", invalid="ignore"):
        v = v.astype(np.float32)
    return np.where(np.isfinite(v), v, np.float32(0)).astype(np.float32)


def make_imatrix(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Importance weights for one block: typical, sparse, flat, extreme or all zero."""
    if kind == 0:
        v = np.abs(rng.standard_normal(256))
    elif kind == 1:
        v = rng.random(256) * (rng.random(256) < 0.5)
    elif kind == 2:
        v = np.ones(256)
    elif kind == 3:
        v = np.abs(rng.standard_normal(256)) * 10.0 ** rng.uniform(-30, 30)
    else:
        v = np.zeros(256)
    return v.astype(np.float32)


@st.composite
def block_sets(draw, with_imatrix: bool):
    """``(x, imatrix)``: a few blocks of mixed flavours, and per-block weights or None."""
    kinds = draw(st.lists(st.integers(0, N_KINDS - 1), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = np.stack([make_block(k, rng) for k in kinds])
    if not with_imatrix:
        return x, None
    im = np.stack([make_imatrix(int(k), rng) for k in rng.integers(0, 5, len(kinds))])
    return x, im


def ggml_bytes(oracle, x: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> np.ndarray:
    """ggml's blocks for ``x`` (n, 256); the blocks form one row so each gets its own weights."""
    row = x.reshape(1, -1)
    im = None if imatrix is None else imatrix.reshape(-1)
    return oracle.quantize(row, qtype, im).reshape(x.shape[0], -1)


def ours(x: np.ndarray, qtype: T, imatrix: np.ndarray | None) -> np.ndarray:
    im = None if imatrix is None else torch.from_numpy(imatrix)
    out = get_quant_type(qtype).quantize_blocks(torch.from_numpy(x), im)
    assert out.dtype == torch.uint8
    return out.numpy()


def assert_same_blocks(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert bad.size == 0, (f"{what}: {bad.size} of {len(want)} blocks differ, "
                           f"first {bad[:5].tolist()}")


_SETTINGS = settings(max_examples=12, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@_SETTINGS
@given(data=block_sets(with_imatrix=False))
def test_k_quant_matches_ggml_reference_quantizer(oracle, qtype, data):
    x, _ = data
    assert_same_blocks(ours(x, qtype, None), ggml_bytes(oracle, x, qtype, None), qtype.name)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@_SETTINGS
@given(data=block_sets(with_imatrix=True))
def test_k_quant_with_imatrix_matches_ggml(oracle, qtype, data):
    x, im = data
    assert_same_blocks(ours(x, qtype, im), ggml_bytes(oracle, x, qtype, im),
                       f"{qtype.name} + imatrix")


@pytest.mark.parametrize("cpu_sums", [True, False], ids=["cpu-sums", "gpu-sums"])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_matches_ggml_on_every_block_flavour(oracle, qtype, cpu_sums, monkeypatch):
    # "gpu-sums": CUDA cannot use the CPU's in-order reductions (embedding_bag, index_add_) and
    # adds term by term instead; CI has no GPU, so that loop runs here on CPU tensors.
    from ggufvideo.quants import _quantize_common

    monkeypatch.setattr(_quantize_common, "CPU_FAST_SUMS", cpu_sums)
    rng = np.random.default_rng(1234)
    x = np.stack([make_block(k % N_KINDS, rng) for k in range(3 * N_KINDS)])
    im = np.stack([make_imatrix(k % 5, rng) for k in range(len(x))])
    assert_same_blocks(ours(x, qtype, None), ggml_bytes(oracle, x, qtype, None), qtype.name)
    assert_same_blocks(ours(x, qtype, im), ggml_bytes(oracle, x, qtype, im),
                       f"{qtype.name} + imatrix")


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_with_overflowing_weights_matches_ggml(oracle, qtype):
    # x*x overflows, so the weighted searches produce NaN scales: ggml then stores a NaN float16
    # scale, re-reads it, and nearest_int(NaN) gives code 0 (found by hypothesis).
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 256)) * 1e21).astype(np.float32)
    im = (rng.random((4, 256)) * 2e-8).astype(np.float32)
    assert_same_blocks(ours(x, qtype, im), ggml_bytes(oracle, x, qtype, im),
                       f"{qtype.name} + imatrix")
    assert_same_blocks(ours(x, qtype, None), ggml_bytes(oracle, x, qtype, None), qtype.name)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_of_gaussian_weights_matches_ggml_across_chunks(oracle, qtype, monkeypatch):
    # Several internal chunks, the last one smaller, so chunk boundaries and the work buffers
    # the chunks share (sized by the first, reused as views by the rest) are exercised; every
    # block flavour lands in some chunk after the first.
    from ggufvideo.quants import _quantize_kquants

    monkeypatch.setattr(_quantize_kquants, "_CHUNK_BLOCKS", 64)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((300, 256)) * 0.02).astype(np.float32)
    x[100::7] = np.stack([make_block(k % N_KINDS, rng) for k in range(len(x[100::7]))])
    im = np.abs(rng.standard_normal((300, 256))).astype(np.float32)
    assert_same_blocks(ours(x, qtype, None), ggml_bytes(oracle, x, qtype, None), qtype.name)
    assert_same_blocks(ours(x, qtype, im), ggml_bytes(oracle, x, qtype, im),
                       f"{qtype.name} + imatrix")


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_output_has_declared_block_size(qtype):
    qt = get_quant_type(qtype)
    out = qt.quantize_blocks(torch.randn(3, 256), None)
    assert out.shape == (3, qt.type_size()) and out.dtype == torch.uint8
    assert qt.quantize_blocks(torch.empty(0, 256), None).shape == (0, qt.type_size())


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_rejects_wrong_block_shape(qtype):
    qt = get_quant_type(qtype)
    with pytest.raises(QuantizationError, match="256"):
        qt.quantize_blocks(torch.randn(2, 32), None)
    with pytest.raises(QuantizationError, match="imatrix"):
        qt.quantize_blocks(torch.randn(2, 256), torch.ones(1, 256))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quant_on_cuda_matches_cpu(qtype):
    rng = np.random.default_rng(99)
    x = np.stack([make_block(k % N_KINDS, rng) for k in range(4 * N_KINDS)])
    im = np.stack([make_imatrix(k % 5, rng) for k in range(len(x))])
    qt = get_quant_type(qtype)
    xt, it = torch.from_numpy(x), torch.from_numpy(im)
    for w in (None, it):
        cpu = qt.quantize_blocks(xt, w)
        gpu = qt.quantize_blocks(xt.cuda(), None if w is None else w.cuda())
        assert gpu.device.type == "cuda"
        assert_same_blocks(gpu.cpu().numpy(), cpu.numpy(), f"{qtype.name} cuda vs cpu")


def _q3_search_step_by_step(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants`` (nmax 4) with the descent run position by position, ggml's own order
    (the generic ``_descend``), as the reference for the round-based descent."""
    from ggufvideo.quants import _kquant_search as KQ
    from ggufvideo.quants import _quantize_common as C

    amax, mx = C.first_abs_max(X, 0, nan_never_wins=True)
    zero = ~(amax >= C.GROUP_MAX_EPS)
    iscale = torch.where(zero, 0.0, C.div(-4.0, mx))
    L = KQ._round_clamp(X * iscale, -4, 3)
    w = X * X
    wx = w * X
    sumlx, suml2 = C.seq_sum(wx * L), C.seq_sum((w * L).mul_(L))
    sumlx, suml2 = KQ._descend(X, w, wx, L, sumlx, suml2, -4, 3, qp_rules=False)
    scale = torch.where(suml2 > 0, C.div(sumlx, suml2), 0.0)
    return torch.where(zero, 0.0, scale), (L + 4).mul_((~zero).to(torch.float32))


@pytest.mark.parametrize("seed", [0, 1])
def test_q3_k_round_descent_matches_step_by_step_descent(seed):
    # Thousands of groups, so columns take up to a dozen changes and some hit the five-pass
    # limit; every block flavour is mixed in, including ones whose steps need the exact
    # rounding (huge or NaN quotients).
    from ggufvideo.quants import _kquant_search as KQ
    from ggufvideo.quants import _kquant_search_q3 as KQ3

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((600, 256)).astype(np.float32)
    x[::5] = np.stack([make_block(k % N_KINDS, rng) for k in range(len(x[::5]))])
    X = KQ._pos_major(torch.from_numpy(x), 16)
    want_scale, want_L = _q3_search_step_by_step(X.clone())
    got_scale, got_L = KQ3._make_q3(X.clone(), 4)
    assert torch.equal(got_scale.view(torch.int32), want_scale.view(torch.int32))
    assert torch.equal(got_L, want_L)


def test_q3_k_of_many_gaussian_blocks_matches_ggml(oracle):
    # Enough groups that the busiest columns of the round-based descent run to the pass limit.
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((1500, 256)) * 0.05).astype(np.float32)
    assert_same_blocks(ours(x, T.Q3_K, None), ggml_bytes(oracle, x, T.Q3_K, None), "Q3_K")
