"""The Triton fast path (ggufvideo.kernels): bit-exact dequant, fused linear, ops, the switch.

Where to run: with a CUDA device the kernels run natively; without one, and with triton installed,
they run under Triton's interpreter (``TRITON_INTERPRET=1``, set below before triton is first
imported) on tiny shapes, so their logic is tested on every CI push. Without triton the kernel
tests skip. Tests marked ``gpu`` need CUDA and skip without it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import finite_blocks

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    # Must precede the first import of triton-decorated code (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

from ggufvideo import GGMLTensor, kernels  # noqa: E402
from ggufvideo.quants import dequantize as torch_dequantize  # noqa: E402
from ggufvideo.quants import get_quant_type  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")

TYPES = sorted(kernels.DEQUANT_TYPES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _blocks(qtype: str, n_blocks: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(finite_blocks(qtype, n_blocks, seed)).to(DEVICE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_kernel_is_bit_identical_to_torch_path(qtype: str, dtype: torch.dtype) -> None:
    from ggufvideo.kernels._dequant import dequantize_into

    qt = get_quant_type(qtype)
    # A block count that leaves a partial last tile (tiles hold 4096 elements).
    n_blocks = 4096 // qt.block_size + 3
    raw = _blocks(qtype, n_blocks, seed=n_blocks * 7 + len(qtype))
    out = torch.full((n_blocks * qt.block_size,), float("nan"), dtype=dtype, device=DEVICE)
    dequantize_into(raw, qtype, out)  # poisoned output: every element must be written
    ref = torch_dequantize(raw, qtype, dtype=dtype).reshape(-1)
    assert torch.equal(_bits(out), _bits(ref))


@needs_triton
@settings(max_examples=12, deadline=None)
@given(qtype=st.sampled_from(TYPES), n_blocks=st.integers(1, 9), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(DTYPES))
def test_dequant_wrapper_matches_torch_path_on_random_blocks(qtype: str, n_blocks: int, seed: int,
                                                             dtype: torch.dtype) -> None:
    qt = get_quant_type(qtype)
    raw = _blocks(qtype, n_blocks, seed)
    got = kernels.dequantize(raw, qtype, (n_blocks, qt.block_size), dtype)
    assert torch.equal(_bits(got), _bits(torch_dequantize(raw, qtype, dtype=dtype)))


def _fused_case(qtype: str, n: int, k: int, m: int, dtype: torch.dtype, seed: int):
    qt = get_quant_type(qtype)
    raw = _blocks(qtype, n * k // qt.block_size, seed).view(n, -1)
    # Moderate scales: random f16 bit patterns reach 65504, whose products overflow fp16 outputs.
    d_field = qt.layout["d"]
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(raw.numel() // qt.type_size(), 1, generator=gen) * 0.01).to(torch.float16)
    raw.view(-1, qt.type_size())[:, d_field.offset:d_field.offset + 2] = d.view(torch.uint8).to(DEVICE)
    if "dmin" in {f.name for f in qt.layout.fields}:
        f = qt.layout["dmin"]
        raw.view(-1, qt.type_size())[:, f.offset:f.offset + 2] = d.view(torch.uint8).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch_dequantize(raw, qtype, dtype=dtype)
    return raw, x, w


def _exact_product(raw: torch.Tensor, qtype: str, x: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ W.T`` in float64 on the exactly decoded (float32) weight: what the fused kernel computes."""
    w32 = torch_dequantize(raw, qtype, dtype=torch.float32).reshape(n, -1)
    return x.double() @ w32.double().T


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@needs_triton
@pytest.mark.parametrize("qtype", sorted(kernels.FUSED_TYPES))
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("rule", [None, (16, 64, 4, 2)], ids=["auto", "split"])
def test_fused_linear_matches_exact_product(qtype: str, m: int, rule) -> None:
    # m=1 takes a one-row kernel (row, GEMV or chunked), m=5 (past every type's cuda_core_rows)
    # the tl.dot branch; "split" splits K across programs.
    from ggufvideo.kernels._matmul import fused_linear

    raw, x, _ = _fused_case(qtype, n=40, k=512, m=m, dtype=torch.bfloat16, seed=11)
    y = fused_linear(x, raw, qtype, 40, rule=rule)
    assert y.dtype == torch.bfloat16 and y.shape == (m, 40)
    # The kernel multiplies by the exact weights and accumulates in float32: only the bf16
    # output rounding (relative 2**-9 at most, ~1e-3 rms) separates it from the float64 product.
    assert _rel_err(y, _exact_product(raw, qtype, x, 40)) < 2.5e-3


@needs_triton
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q8_0", "Q6_K", "Q4_0"])
def test_one_row_chunked_kernel_also_matches_for_gemv_types(qtype: str) -> None:
    # These types take the row or GEMV kernel for one row by default; the chunked kernel's
    # one-row branch must stay right for them too (it is what `gemv=False` runs).
    from ggufvideo.kernels._matmul import fused_linear

    raw, x, _ = _fused_case(qtype, n=40, k=512, m=1, dtype=torch.bfloat16, seed=13)
    ref = _exact_product(raw, qtype, x, 40)
    assert _rel_err(fused_linear(x, raw, qtype, 40, gemv=False), ref) < 2.5e-3
    assert _rel_err(fused_linear(x, raw, qtype, 40), ref) < 2.5e-3


@needs_triton
@pytest.mark.parametrize("qtype,m,gemv", [("Q4_K", 1, False), ("Q4_K", 3, None),
                                          ("Q5_K", 1, None), ("Q4_K", 1, None)],
                         ids=["chunked-one-row", "tensor-core", "gemv", "rows"])
def test_split_k_sums_added_in_kernel_equal_the_reduction_kernel(qtype: str, m: int,
                                                                gemv: bool | None) -> None:
    # The last program of each column tile adds the K-split partial sums in split order: the same
    # bits as the separate reduction kernel, and the arrival counters are back at zero after.
    from ggufvideo.kernels._matmul import fused_linear, split_for

    raw, x, _ = _fused_case(qtype, n=40, k=1024, m=m, dtype=torch.bfloat16, seed=17)
    rule = (16, 64, 4, 2)
    assert split_for(m, 40, 1024, 16, 64, x.device) == 4  # really split
    in_kernel = fused_linear(x, raw, qtype, 40, rule=rule, fixup=True, gemv=gemv)
    second_kernel = fused_linear(x, raw, qtype, 40, rule=rule, fixup=False, gemv=gemv)
    assert torch.equal(in_kernel, second_kernel)
    assert torch.equal(fused_linear(x, raw, qtype, 40, rule=rule, gemv=gemv), in_kernel)
    from ggufvideo.kernels import _matmul

    buf, _ = _matmul._RINGS[x.device]
    assert not buf.any()  # every slot used was reset
    assert _rel_err(in_kernel, _exact_product(raw, qtype, x, 40)) < 2.5e-3


@needs_triton
def test_split_k_without_counters_refuses_forced_fixup_and_falls_back_otherwise(monkeypatch) -> None:
    from ggufvideo.kernels import _matmul

    raw, x, _ = _fused_case("Q4_K", n=40, k=1024, m=3, dtype=torch.bfloat16, seed=19)
    rule = (16, 64, 4, 2)  # 3 column tiles, K split in 4
    expected = _matmul.fused_linear(x, raw, "Q4_K", 40, rule=rule, fixup=False)
    monkeypatch.setattr(_matmul, "COUNTER_RING", 2)  # fewer slots than tiles: no counters
    with pytest.raises(RuntimeError, match="fixup=True but no arrival counters for 3 column tiles"):
        _matmul.fused_linear(x, raw, "Q4_K", 40, rule=rule, fixup=True)
    assert torch.equal(_matmul.fused_linear(x, raw, "Q4_K", 40, rule=rule), expected)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,rule", [(1792, (4, 2, 4, 1)), (1792, (4, 64, 2, 1)), (256, None),
                                    (2048, None)],
                         ids=["tail", "tail-split", "one-block", "whole-steps"])
def test_row_kernel_handles_ragged_rows_and_blocks(dtype: torch.dtype, k: int, rule) -> None:
    # The row kernel walks 4 super-blocks per warp step and 4 weight rows per program by default:
    # K = 7 super-blocks leaves a partial step (masked, after one whole step without masks),
    # K = 8 two whole steps, N = 22 a partial program, and the split rule cuts K unevenly
    # (7 blocks in 4 splits: 2, 2, 2, 1: each a partial step).
    from ggufvideo.kernels import _matmul

    assert "Q4_K" in _matmul.ROW_STEPS
    raw, x, _ = _fused_case("Q4_K", n=22, k=k, m=1, dtype=dtype, seed=23)
    y = _matmul.fused_linear(x, raw, "Q4_K", 22, rule=rule)
    assert y.dtype == dtype and y.shape == (1, 22)
    assert _rel_err(y, _exact_product(raw, "Q4_K", x, 22)) < (2.5e-3 if dtype == torch.bfloat16
                                                                  else 1e-3)


FEW_ROW_CASES = [("Q4_K", 2, 1792, None), ("Q4_K", 3, 1792, (4, 64, 2, 1)),
                 ("Q4_K", 4, 2048, None), ("Q4_K", 4, 1792, (4, 64, 2, 1)),
                 ("Q8_0", 3, 768, None), ("Q5_K", 2, 768, (16, 64, 4, 1)), ("Q6_K", 4, 512, None),
                 ("Q4_0", 2, 768, (16, 64, 4, 1)), ("Q4_0", 4, 512, None)]


@needs_triton
@pytest.mark.parametrize("qtype,m,k,rule", FEW_ROW_CASES,
                         ids=[f"{c[0]}-{c[1]}rows-{'split' if c[3] else 'auto'}-{c[2]}"
                              for c in FEW_ROW_CASES])
def test_one_row_kernels_take_a_few_rows(qtype: str, m: int, k: int, rule) -> None:
    # Up to ROW_MAX_M activation rows share one decode of the weight (BM = 2 or 4; M = 3 leaves
    # the fourth row unstored), in the row kernel (Q4_K) and the GEMV kernel (the others); ragged
    # K, uneven K splits with in-kernel sums, N = 22.
    from ggufvideo.kernels import _matmul

    assert m <= _matmul.ROW_MAX_M
    raw, x, _ = _fused_case(qtype, n=22, k=k, m=m, dtype=torch.bfloat16, seed=29)
    if m == 3:  # rows further apart than K: the kernel must follow x's row stride
        x = torch.cat([x, torch.full_like(x[:, :256], float("nan"))], dim=1)[:, :k]
        assert x.stride(0) == k + 256
    fixup = None if rule is None else True
    y = _matmul.fused_linear(x, raw, qtype, 22, rule=rule, gemv=True, fixup=fixup)
    assert y.shape == (m, 22)
    assert _rel_err(y, _exact_product(raw, qtype, x, 22)) < 2.5e-3
    if not HAS_CUDA:  # the interpreter runs each row's arithmetic as the one-row kernel does
        for i in range(m):
            one = _matmul.fused_linear(x[i:i + 1], raw, qtype, 22, rule=rule, gemv=True,
                                       fixup=fixup)
            assert torch.equal(y[i:i + 1], one)


@needs_triton
@pytest.mark.parametrize("qtype,m,cuda_cores", [("Q4_K", 2, True), ("Q4_K", 3, False),
                                                ("Q8_0", 3, True), ("Q6_K", 4, True),
                                                ("Q5_K", 2, False), ("Q4_0", 1, False),
                                                ("Q4_0", 2, True), ("Q4_0", 3, False)])
def test_default_kernel_follows_the_measured_row_table(qtype: str, m: int,
                                                       cuda_cores: bool) -> None:
    # By default the row / GEMV kernel runs (with the settings' rule for 2+ rows) only for the
    # row counts measured faster than the chunked / tensor-core kernel; the paths round
    # differently, so bit-equality with the forced choice shows which one ran.
    from ggufvideo.kernels import _matmul
    from ggufvideo.kernels.settings import settings_for

    tuned = settings_for(qtype, DEVICE)  # on the CPU (interpreter): sm_90's settings
    fewest, most = tuned.cuda_core_rows
    assert (fewest <= m <= most) == cuda_cores
    raw, x, _ = _fused_case(qtype, n=24, k=512, m=m, dtype=torch.bfloat16, seed=31)
    y = _matmul.fused_linear(x, raw, qtype, 24)
    if cuda_cores:
        forced = _matmul.fused_linear(x, raw, qtype, 24, gemv=True,
                                      rule=tuned.few_rows_rule if m > 1 else None)
    else:
        forced = _matmul.fused_linear(x, raw, qtype, 24, gemv=False)
    assert torch.equal(y, forced)
    assert _rel_err(y, _exact_product(raw, qtype, x, 24)) < 2.5e-3


@needs_triton
@pytest.mark.parametrize("qtype,m", [("Q4_K", 5), ("Q8_0", 5), ("Q5_0", 1)])
def test_gemv_kernel_refuses_what_it_cannot_take(qtype: str, m: int) -> None:
    from ggufvideo.kernels._matmul import fused_linear

    raw, x, _ = _fused_case(qtype, n=8, k=256, m=m, dtype=torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="GEMV kernel takes up to 4 rows"):
        fused_linear(x, raw, qtype, 8, gemv=True)


@needs_triton
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("m", [1, 5])
def test_fused_linear_in_float16(qtype: str, m: int) -> None:
    # float16 takes the 0x6400 bit-pattern codes in the tl.dot path (m=5; Q8_0's 0..255 included).
    from ggufvideo.kernels._matmul import fused_linear

    raw, x, _ = _fused_case(qtype, n=24, k=256, m=m, dtype=torch.float16, seed=5)
    y = fused_linear(x, raw, qtype, 24)
    assert y.dtype == torch.float16
    assert _rel_err(y, _exact_product(raw, qtype, x, 24)) < 1e-3


@needs_triton
def test_linear_above_fused_rows_equals_f_linear_on_decoded_weight() -> None:
    # More rows than the fused path takes: decode into the workspace, then F.linear -- the same numbers exactly.
    raw, x, w = _fused_case("Q8_0", n=16, k=256, m=kernels.fused_max_m() + 5, dtype=torch.float32,
                            seed=3)
    bias = torch.randn(16).to(DEVICE)
    y = kernels.linear(x, raw, "Q8_0", 16, bias)
    assert torch.equal(y, F.linear(x, w, bias))


@needs_triton
def test_linear_past_a_types_fused_rows_takes_decode_and_gemm() -> None:
    # Q8_0's fused kernel stops at FUSED_ROWS["Q8_0"] rows (where decode + GEMM wins on an H100):
    # one more row gives F.linear's numbers on the decoded weight exactly, in bf16 too.
    m = kernels.FUSED_ROWS["Q8_0"] + 1
    assert m <= kernels.fused_max_m()
    raw, x, w = _fused_case("Q8_0", n=16, k=256, m=m, dtype=torch.bfloat16, seed=4)
    assert torch.equal(kernels.linear(x, raw, "Q8_0", 16), F.linear(x, w))


@needs_triton
def test_fused_rows_cover_exactly_the_fused_types() -> None:
    from ggufvideo.kernels._matmul import FUSED_TYPES as STEPS
    from ggufvideo.kernels.settings import SM90, UNTUNED

    assert set(kernels.FUSED_ROWS) == set(kernels.FUSED_TYPES) == set(STEPS) == set(SM90)
    assert set(UNTUNED) == set(SM90)
    assert all(0 < rows <= kernels.FUSED_MAX_M for rows in kernels.FUSED_ROWS.values())


def test_settings_are_per_type_and_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    from ggufvideo.kernels import settings

    assert kernels.FUSED_ROWS == {q: settings.settings_for(q, torch.device("cpu")).fused_rows
                                  for q in kernels.FUSED_TYPES}
    monkeypatch.setattr(settings, "_LOOKUP", {})
    monkeypatch.setattr(settings, "capability_of", lambda device: (8, 6))  # nobody tuned sm_86
    for qtype in kernels.FUSED_TYPES:
        got = settings.settings_for(qtype, torch.device("cpu"))
        assert got == settings.UNTUNED[qtype]
        assert got.fused_rows == 0 and got.cuda_core_rows == (0, 0) and got.fixup_tiles == ()
    monkeypatch.setattr(settings, "_TABLE", dict(settings._TABLE))
    settings.set_settings("Q8_0", (8, 6), settings.SM90["Q8_0"])
    assert settings.settings_for("Q8_0", torch.device("cpu")) == settings.SM90["Q8_0"]
    settings.set_settings("Q8_0", (8, 6), None)
    assert settings.settings_for("Q8_0", torch.device("cpu")) == settings.UNTUNED["Q8_0"]
    with pytest.raises(ValueError, match="no fused kernel for 'Q5_0'"):
        settings.set_settings("Q5_0", (8, 6), None)


@needs_triton
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_untuned_gpu_takes_decode_and_gemm_for_every_m(qtype: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU without tuned settings, linear() at one row gives F.linear's numbers on the decoded
    # weight exactly (the fused kernels round differently), and a direct fused_linear call takes
    # the chunked kernel (its forced choice's bits) with the reduction kernel for split-K sums.
    from ggufvideo.kernels import _matmul, settings

    raw, x, w = _fused_case(qtype, n=16, k=512, m=1, dtype=torch.bfloat16, seed=37)
    fused = kernels.linear(x, raw, qtype, 16)
    assert not torch.equal(fused, F.linear(x, w))  # the tuned (sm_90) table fuses one row
    monkeypatch.setattr(settings, "_LOOKUP", {})
    monkeypatch.setattr(settings, "capability_of", lambda device: (8, 0))
    assert torch.equal(kernels.linear(x, raw, qtype, 16), F.linear(x, w))
    rule = (16, 64, 4, 2)
    assert torch.equal(_matmul.fused_linear(x, raw, qtype, 16, rule=rule),
                       _matmul.fused_linear(x, raw, qtype, 16, rule=rule, gemv=False, fixup=False))


@needs_triton
def test_linear_gradient_reaches_activations_only() -> None:
    raw, x, w = _fused_case("Q4_0", n=8, k=256, m=kernels.fused_max_m() + 1, dtype=torch.float32,
                            seed=9)
    x.requires_grad_(True)
    kernels.linear(x, raw, "Q4_0", 8).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(x.shape[0], 8, device=DEVICE) @ w)


def test_two_threads_on_one_stream_do_not_share_the_workspace_mid_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Both threads' calls key the same decode buffer (CPU: stream 0). Each call decodes, then
    # pauses (the wrapper below) before its GEMM; without the workspace lock the other thread's
    # decode lands in the buffer during the pause and the first call multiplies by the wrong
    # weight. The torch decode path is used (kernels switched off): the workspace logic is the same.
    import threading
    import time

    decode = kernels._decode_into

    def slow_decode(raw: torch.Tensor, qtype: int, out: torch.Tensor) -> torch.Tensor:
        result = decode(raw, qtype, out)
        time.sleep(0.05)
        return result

    monkeypatch.setattr(kernels, "_decode_into", slow_decode)
    cases = [_fused_case("Q8_0", n=16, k=256, m=70, dtype=torch.float32, seed=s) for s in (41, 43)]
    results: dict[int, list[bool]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(i: int) -> None:
        raw, x, w = cases[i]
        start.wait()
        for _ in range(3):
            results[i].append(torch.equal(kernels.linear(x, raw, "Q8_0", 16), F.linear(x, w)))

    kernels.release_workspace()
    kernels.set_enabled(False)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        kernels.set_enabled(None)
    assert results == {0: [True] * 3, 1: [True] * 3}
    assert len(kernels._WORKSPACE) == 1  # one shared buffer, not one per thread


def test_custom_ops_are_registered_with_fake_kernels() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        raw = torch.empty(4, 18, dtype=torch.uint8)
        out = torch.ops.ggufvideo.dequantize(raw, int(get_quant_type("Q4_0").qtype), 128,
                                             torch.bfloat16)
        assert out.shape == (128,) and out.dtype == torch.bfloat16
        x = torch.empty(5, 7, 32, dtype=torch.bfloat16)
        y = torch.ops.ggufvideo.quant_linear(x, raw, int(get_quant_type("Q4_0").qtype), 4, None)
        assert y.shape == (5, 7, 4)


@pytest.fixture
def fresh_env():
    """Environment switches read again at their next use, and again after the test."""
    kernels._ENV_VALUES.clear()
    yield
    kernels._ENV_VALUES.clear()


def test_switch_forces_the_torch_path(monkeypatch: pytest.MonkeyPatch, fresh_env) -> None:
    monkeypatch.setenv("GGUFVIDEO_NO_TRITON", "1")
    assert not kernels.is_available("cuda")
    monkeypatch.delenv("GGUFVIDEO_NO_TRITON")
    kernels._ENV_VALUES.clear()
    kernels.set_enabled(False)
    try:
        assert not kernels.is_available("cuda")
    finally:
        kernels.set_enabled(None)
    assert not kernels.is_available("cuda", "IQ2_XS")  # no kernel for that type
    if not HAS_CUDA:
        assert not kernels.is_available("cuda")


def test_wrong_sizes_raise_clear_errors() -> None:
    from ggufvideo.errors import QuantizationError

    with pytest.raises(QuantizationError, match="18 bytes"):
        kernels.dequantize(torch.zeros(17, dtype=torch.uint8), "Q4_0", (32,))
    with pytest.raises(QuantizationError, match="uint8"):
        kernels.dequantize(torch.zeros(18, dtype=torch.int8), "Q4_0", (32,))


def test_importing_ggufvideo_does_not_import_triton() -> None:
    code = ("import sys, ggufvideo, ggufvideo.ops, ggufvideo.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- GPU only ------------------------------------------------------------------------------------
def _quant_linear(qtype: str, k: int, n: int):
    from torch import nn

    from ggufvideo.ops import swap_quant_layers

    qt = get_quant_type(qtype)
    with torch.device("meta"):
        lin = nn.Linear(k, n, bias=True)
    raw, _, _ = _fused_case(qtype, n, k, 1, torch.bfloat16, seed=2)
    lin._parameters["weight"] = nn.Parameter(GGMLTensor(raw, qtype, (n, k), torch.bfloat16),
                                             requires_grad=False)
    lin._parameters["bias"] = nn.Parameter(torch.randn(n, device=DEVICE, dtype=torch.bfloat16))
    assert qt.block_size
    return swap_quant_layers(lin)


def test_fused_path_switch(monkeypatch: pytest.MonkeyPatch, fresh_env) -> None:
    monkeypatch.delenv("GGUFVIDEO_FUSED_MAX_M", raising=False)
    assert kernels.fused_max_m() == kernels.FUSED_MAX_M == 64  # on by default
    monkeypatch.setenv("GGUFVIDEO_FUSED_MAX_M", "0")
    kernels._ENV_VALUES.clear()
    assert kernels.fused_max_m() == 0
    kernels.set_fused_max_m(16)
    try:
        assert kernels.fused_max_m() == 16
    finally:
        kernels.set_fused_max_m(None)
    with pytest.raises(ValueError):
        kernels.set_fused_max_m(65)


def test_environment_switches_are_read_once(monkeypatch: pytest.MonkeyPatch, fresh_env) -> None:
    monkeypatch.setenv("GGUFVIDEO_FUSED_MAX_M", "8")
    monkeypatch.setenv("GGUFVIDEO_NO_TRITON", " Yes ")
    assert kernels.fused_max_m() == 8 and not kernels._switched_on()
    monkeypatch.setenv("GGUFVIDEO_FUSED_MAX_M", "16")
    monkeypatch.setenv("GGUFVIDEO_NO_TRITON", "0")
    assert kernels.fused_max_m() == 8 and not kernels._switched_on()  # kept from first use


@pytest.mark.parametrize("value", ["maybe", "2", "disable"])
def test_bad_no_triton_value_is_an_error(monkeypatch: pytest.MonkeyPatch, fresh_env,
                                         value: str) -> None:
    monkeypatch.setenv("GGUFVIDEO_NO_TRITON", value)
    with pytest.raises(ValueError, match=rf"GGUFVIDEO_NO_TRITON='{value}' is not an accepted "
                                         r"value: use 1, true, yes or on .* 0, false, no, off"):
        kernels.is_available("cuda")


@pytest.mark.parametrize("value", ["sixteen", "1.5", ""])
def test_non_integer_fused_max_m_is_an_error(monkeypatch: pytest.MonkeyPatch, fresh_env,
                                             value: str) -> None:
    monkeypatch.setenv("GGUFVIDEO_FUSED_MAX_M", value)
    with pytest.raises(ValueError, match=r"GGUFVIDEO_FUSED_MAX_M=.* is not an accepted value: "
                                         r"use an integer in 0\.\.64"):
        kernels.fused_max_m()


@pytest.mark.parametrize("value", ["-1", "65"])
def test_out_of_range_fused_max_m_is_an_error(monkeypatch: pytest.MonkeyPatch, fresh_env,
                                              value: str) -> None:
    monkeypatch.setenv("GGUFVIDEO_FUSED_MAX_M", value)
    with pytest.raises(ValueError, match=rf"GGUFVIDEO_FUSED_MAX_M='{value}' .* integer in 0\.\.64"):
        kernels.fused_max_m()


@needs_triton
def test_linear_with_fused_path_on_matches_matmul() -> None:
    raw, x, w = _fused_case("Q4_K", n=24, k=256, m=3, dtype=torch.bfloat16, seed=8)
    kernels.set_fused_max_m(64)
    try:
        y = kernels.linear(x, raw, "Q4_K", 24)
    finally:
        kernels.set_fused_max_m(None)
    assert _rel_err(y, _exact_product(raw, "Q4_K", x, 24)) < 2.5e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("fused", [0, 64])
@pytest.mark.parametrize("m", [3, 200])
def test_quant_linear_layer_takes_fast_path_and_matches_torch_path(m: int, fused: int) -> None:
    lin = _quant_linear("Q4_K", 512, 96)
    x = torch.randn(m, 512, device=DEVICE, dtype=torch.bfloat16)
    kernels.set_fused_max_m(fused)
    with torch.no_grad():
        try:
            fast = lin(x)
            kernels.set_enabled(False)
            slow = lin(x)
        finally:
            kernels.set_enabled(None)
            kernels.set_fused_max_m(None)
    if m > fused:
        assert torch.equal(fast, slow)
    else:
        assert ((fast.float() - slow.float()).norm() / slow.float().norm()).item() < 1e-2


@gpu
@needs_cuda
def test_quant_linear_compiles_fullgraph_and_replays_in_cuda_graph() -> None:
    lin = _quant_linear("Q8_0", 256, 64)
    x = torch.randn(4, 256, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = lin(x)
        assert torch.equal(torch.compile(lin, fullgraph=True)(x), eager)
        static_x = x.clone()
        lin(static_x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = lin(static_x)
        x2 = torch.randn_like(x)
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, lin(x2))


@gpu
@needs_cuda
def test_split_k_linear_replays_in_cuda_graph() -> None:
    # The capture reuses the arrival counters' ring made by an earlier call (no allocation inside
    # the capture), and the counters reset so that every replay is right; a capture on a device
    # with no ring yet falls back to the reduction kernel.
    from ggufvideo.kernels import _matmul

    # Q4_K with a 16-row tile: the default there adds the partial sums in the kernel.
    raw, x, _ = _fused_case("Q4_K", n=64, k=2048, m=3, dtype=torch.bfloat16, seed=23)
    from ggufvideo.kernels.settings import settings_for

    assert _matmul.block_m(3) in settings_for("Q4_K", x.device).fixup_tiles
    rule = (16, 64, 4, 1)
    eager = _matmul.fused_linear(x, raw, "Q4_K", 64, rule=rule, fixup=False)
    saved = _matmul._RINGS.pop(x.device, None)
    try:
        for ring_before_capture in (False, True):
            if ring_before_capture:
                _matmul.fused_linear(x, raw, "Q4_K", 64, rule=rule)
            static_x = x.clone()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_y = _matmul.fused_linear(static_x, raw, "Q4_K", 64, rule=rule)
            assert (x.device in _matmul._RINGS) == ring_before_capture
            for _ in range(3):
                static_y.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                assert torch.equal(static_y, eager)
            assert not _matmul._RINGS.get(x.device, [torch.zeros(1)])[0].any()
    finally:
        if saved is not None:
            _matmul._RINGS[x.device] = saved


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("rank", [4, 32, 96])
def test_lora_up_add_kernel_adds_the_up_projection_in_place(rank: int, dtype: torch.dtype,
                                                            monkeypatch) -> None:
    """``out += h @ up_t`` on strided views (``out`` and ``h`` columns of one buffer, rows further
    apart than their width): float32 accumulation, one rounding -- what addmm_ computes."""
    monkeypatch.setattr(kernels, "LORA_MAX_RANK", 256)  # the kernel for every rank here
    torch.manual_seed(rank)
    m, n = 70, 300  # partial tiles in both directions
    buf = torch.randn(m, n + rank, device=DEVICE).to(dtype)
    up_t = (torch.randn(rank, n, device=DEVICE) * 0.1).to(dtype)
    expected = (buf[:, :n].float() + buf[:, n:].float() @ up_t.float()).to(dtype)
    h_before = buf[:, n:].clone()
    kernels.lora_up_add(buf[:, :n], buf[:, n:], up_t)
    assert torch.equal(buf[:, n:], h_before)  # only the output columns change
    diff = (buf[:, :n].float() - expected.float()).abs()
    # one rounding of the float32 sum: at most one unit in the last place of the result
    ulp = expected.float().abs() * (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7)
    assert bool((diff <= ulp + 1e-6).all())


def test_lora_up_add_falls_back_to_addmm_outside_the_kernel() -> None:
    """float32 (or a rank past LORA_MAX_RANK) takes ``addmm_``: the same values."""
    torch.manual_seed(0)
    out = torch.randn(5, 7)
    h, up_t = torch.randn(5, 3), torch.randn(3, 7)
    expected = out.addmm(h, up_t)
    kernels.lora_up_add(out, h, up_t)
    assert torch.equal(out, expected)
    rank = kernels.LORA_MAX_RANK + 1
    out = torch.randn(9, 40).to(torch.bfloat16)
    h, up_t = torch.randn(9, rank).to(torch.bfloat16), torch.randn(rank, 40).to(torch.bfloat16)
    expected = out.addmm(h, up_t)
    kernels.lora_up_add(out, h, up_t)
    assert torch.equal(out, expected)
