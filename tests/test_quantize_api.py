"""The public row API ``ggufvideo.quantize``: shapes, dtypes, chunking, routing and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from quantize_inputs import float_rows, imatrix_row

import ggufvideo
import ggufvideo.quants as quants
from ggufvideo import QuantizationError, UnsupportedTypeError, dequantize, quantize
from ggufvideo.imatrix import USES_IMATRIX
from ggufvideo.quants import get_quant_type

ALL = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K,
       T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]


def test_quantize_is_exported_from_the_package():
    assert ggufvideo.quantize is quants.quantize
    assert "quantize" in ggufvideo.__all__


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_quantize_returns_row_bytes_and_round_trips_shape(qtype):
    x = torch.from_numpy(float_rows(0, 6, 512, "normal")).reshape(2, 3, 512)
    q = quantize(x, qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    assert q.dtype == torch.uint8 and q.shape == (2, 3, 512 // bs * ts)
    y = dequantize(q, qtype)
    assert y.shape == x.shape and y.dtype == torch.float32


@pytest.mark.parametrize("cpu_sums", [True, False], ids=["cpu-sums", "gpu-sums"])
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_quantize_matches_ggml_reference_for_every_supported_type(oracle, qtype, cpu_sums,
                                                                  monkeypatch):
    # "gpu-sums": the explicit in-order loop that CUDA runs instead of the CPU's reductions.
    from ggufvideo.quants import _quantize_common

    monkeypatch.setattr(_quantize_common, "CPU_FAST_SUMS", cpu_sums)
    x = float_rows(1, 3, 512, "normal")
    im = imatrix_row(1, 512, "uniform")
    ours = quantize(torch.from_numpy(x), qtype).numpy()
    np.testing.assert_array_equal(ours, oracle.quantize(x, qtype))
    ours = quantize(torch.from_numpy(x), qtype, imatrix=torch.from_numpy(im)).numpy()
    np.testing.assert_array_equal(ours, oracle.quantize(x, qtype, im))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.IQ4_XS], ids=lambda t: t.name)
def test_chunked_rows_give_the_same_bytes(monkeypatch, qtype):
    x = torch.from_numpy(float_rows(2, 9, 512, "normal"))
    im = torch.from_numpy(imatrix_row(2, 512, "uniform"))
    whole = quantize(x, qtype, imatrix=im)
    monkeypatch.setattr(quants, "_QUANTIZE_CHUNK_ELEMENTS", 1000)  # one row per step
    assert torch.equal(quantize(x, qtype, imatrix=im), whole)
    assert torch.equal(quantize(x, qtype), quantize(x.clone(), qtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_quantized_from_their_float32_value(dtype):
    x = torch.from_numpy(float_rows(3, 2, 256, "normal")).to(dtype)
    assert torch.equal(quantize(x, "Q4_K"), quantize(x.to(torch.float32), "Q4_K"))
    assert torch.equal(quantize(x, "IQ4_NL"), quantize(x.to(torch.float32), "IQ4_NL"))


def test_imatrix_may_be_any_real_sequence():
    x = torch.from_numpy(float_rows(4, 2, 64, "normal"))
    im = imatrix_row(4, 64, "uniform")
    ref = quantize(x, "Q5_1", imatrix=torch.from_numpy(im))
    assert torch.equal(quantize(x, "Q5_1", imatrix=im.astype(np.float64)), ref)
    assert torch.equal(quantize(x, "Q5_1", imatrix=list(map(float, im))), ref)


def test_empty_input_gives_empty_bytes():
    assert quantize(torch.zeros(0, 64), "Q4_0").shape == (0, 36)
    assert quantize(torch.zeros(3, 0), "Q8_0").shape == (3, 0)


def test_row_length_not_a_multiple_of_the_block_size_raises_clear_error():
    with pytest.raises(QuantizationError, match=r"Q4_K: row length 300 .*block size 256"):
        quantize(torch.zeros(2, 300), "Q4_K")


def test_non_float_input_raises_clear_error():
    with pytest.raises(QuantizationError, match=r"Q8_0.*floating-point.*torch.int32"):
        quantize(torch.zeros(2, 32, dtype=torch.int32), "Q8_0")


def test_non_tensor_input_raises_clear_error():
    with pytest.raises(QuantizationError, match="torch.Tensor"):
        quantize(np.zeros((2, 32), dtype=np.float32), "Q8_0")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_clear_error(bad):
    x = torch.zeros(3, 64)
    x[2, 40] = bad
    with pytest.raises(QuantizationError, match=r"finite.*row 2, column 40"):
        quantize(x, "Q4_0")


def test_value_overflowing_float32_is_non_finite():
    x = torch.zeros(1, 32, dtype=torch.float64)
    x[0, 3] = 1e300
    with pytest.raises(QuantizationError, match="finite in float32"):
        quantize(x, "Q8_0")


def test_imatrix_of_the_wrong_length_raises_clear_error():
    with pytest.raises(QuantizationError,
                       match=r"imatrix must be a 1-D tensor of 64 weights.*\(32,\)"):
        quantize(torch.zeros(2, 64), "Q4_1", imatrix=torch.ones(32))
    with pytest.raises(QuantizationError, match="1-D"):
        quantize(torch.zeros(2, 64), "Q4_1", imatrix=torch.ones(2, 64))


def test_negative_imatrix_raises_clear_error():
    im = torch.ones(64)
    im[5] = -1.0
    with pytest.raises(QuantizationError, match=r">= 0.*position 5"):
        quantize(torch.zeros(2, 64), "IQ4_NL", imatrix=im)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_imatrix_raises_clear_error(bad):
    im = torch.ones(64)
    im[7] = bad
    with pytest.raises(QuantizationError, match=r"imatrix must be finite.*position 7"):
        quantize(torch.zeros(2, 64), "Q5_0", imatrix=im)


def test_unsupported_target_type_raises_clear_error():
    with pytest.raises(UnsupportedTypeError, match="quantizing to IQ2_XXS is not supported"):
        quantize(torch.zeros(2, 256), "IQ2_XXS")
    with pytest.raises(UnsupportedTypeError, match="quantizing to I32 is not supported"):
        quantize(torch.zeros(2, 4), "I32")


def test_unknown_type_name_raises_clear_error():
    with pytest.raises(UnsupportedTypeError, match="Q9_9"):
        quantize(torch.zeros(2, 32), "Q9_9")


def test_zero_dim_input_raises_clear_error():
    with pytest.raises(QuantizationError, match="0-d"):
        quantize(torch.tensor(1.0), "F16")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_cuda_input_gives_the_cpu_bytes(qtype):
    x = torch.from_numpy(float_rows(5, 4, 512, "normal"))
    im = torch.from_numpy(imatrix_row(5, 512, "uniform"))
    for w in (None, im):
        cpu = quantize(x, qtype, imatrix=w)
        gpu = quantize(x.cuda(), qtype, imatrix=None if w is None else w.cuda())
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.IQ4_NL, T.IQ4_XS, T.F16],
                         ids=lambda t: t.name)
def test_parameters_that_require_grad_are_quantized_without_a_graph(qtype):
    p = torch.nn.Parameter(torch.from_numpy(float_rows(6, 2, 256, "normal")))
    im = torch.nn.Parameter(torch.from_numpy(imatrix_row(6, 256, "uniform")))
    q = quantize(p, qtype, imatrix=im)
    assert not q.requires_grad
    assert torch.equal(q, quantize(p.detach(), qtype, imatrix=im.detach()))


@pytest.mark.parametrize("weighted", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("qtype", sorted(USES_IMATRIX), ids=lambda t: t.name)
def test_registry_quantize_blocks_gives_the_bytes_of_quantize(qtype, weighted):
    # quantize() has one path, the registry's quantize_blocks, for every type (the weighted
    # Q4_0..Q5_1 encoders used to be called around it). Rows of several blocks, the second half
    # much larger, so a row-wide statistic (the legacy types' mean square) changes the bytes.
    qt = get_quant_type(qtype)
    bs, rows, n = qt.block_size, 3, 512
    x = torch.from_numpy(float_rows(11, rows, n, "normal"))
    x[:, n // 2:] *= 100
    w = torch.from_numpy(imatrix_row(11, n, "uniform")) if weighted else None
    blocks = x.reshape(-1, bs)
    wb = None if w is None else w.reshape(1, -1, bs).expand(rows, -1, -1).reshape(-1, bs)
    got = qt.quantize_blocks(blocks, wb, blocks_per_row=n // bs)
    assert torch.equal(got.reshape(rows, -1), quantize(x, qtype, imatrix=w))
    # Rows of one block: the plain call (each block a row) is quantize() byte for byte.
    x1 = x[:, :bs].contiguous()
    w1 = None if w is None else w[:bs].contiguous()
    got1 = qt.quantize_blocks(x1, None if w1 is None else w1.expand(rows, bs).contiguous())
    assert torch.equal(got1, quantize(x1, qtype, imatrix=w1))
