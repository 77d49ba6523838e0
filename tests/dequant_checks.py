"""The per-type dequantization spec, shared by test_quants_legacy.py and test_quants_kquants.py.

:func:`type_tests` returns test functions named like the spec
(``test_q4_k_matches_ggml_reference`` ...) for one ggml type; a test module puts them in its
globals so pytest collects them under those names.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import block_arrays, finite_blocks

import ggufvideo.quants as quants
from ggufvideo.errors import QuantizationError
from ggufvideo.quants import dequantize, get_quant_type

_SETTINGS = settings(max_examples=40, deadline=None)


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float tensor/array, so that -0.0 != 0.0 and NaN == NaN."""
    a = x.cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.contiguous().view(width).numpy()


def decode_f32(qtype: GGMLQuantizationType, raw: np.ndarray) -> np.ndarray:
    """Our float32 decode of ``(n_blocks, type_size)`` blocks, as ``(n_blocks, block_size)``."""
    return get_quant_type(qtype).dequantize_blocks(torch.from_numpy(raw)).numpy()


def assert_same_bits(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray,
                     what: str) -> None:
    """Equal bit for bit (signed zeros, infinities and NaN payloads included)."""
    g, w = _bits(got), _bits(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1))
    assert bad.size == 0, (f"{what}: {bad.size} of {g.size} elements differ, first at flat index "
                           f"{bad[0]}")


def type_tests(name: str) -> dict[str, Callable[..., None]]:
    """The spec of ``name``'s dequantizer as ``{test_name: test_function}``."""
    qtype = GGMLQuantizationType[name]
    qt = get_quant_type(qtype)
    low = name.lower()

    @_SETTINGS
    @given(raw=block_arrays(qtype))
    def matches_ggml_reference(oracle, raw: np.ndarray) -> None:
        got = qt.dequantize_blocks(torch.from_numpy(raw))
        assert got.dtype == torch.float32
        assert_same_bits(got, oracle.dequantize(raw, qtype), f"{name} vs ggml")

    @_SETTINGS
    @given(raw=block_arrays(qtype))
    def matches_gguf_py(raw: np.ndarray) -> None:
        got = dequantize(torch.from_numpy(raw).reshape(-1), qtype)
        assert_same_bits(got, gguf_quants.dequantize(raw.reshape(-1), qtype), f"{name} vs gguf-py")

    @_SETTINGS
    @given(raw=block_arrays(qtype), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
    def half_output_is_float32_rounded_once(raw: np.ndarray, dtype: torch.dtype) -> None:
        data = torch.from_numpy(raw).reshape(-1)
        exact = dequantize(data, qtype, dtype=torch.float32)
        got = dequantize(data, qtype, dtype=dtype)
        assert got.dtype == dtype
        assert_same_bits(got, exact.to(dtype), f"{name} -> {dtype}")

    def keeps_leading_dims() -> None:
        raw = finite_blocks(qtype, 2 * 3 * 4, seed=7)
        data = torch.from_numpy(raw).reshape(2, 3, 4 * qt.type_size())
        got = dequantize(data, qtype)
        assert got.shape == (2, 3, 4 * qt.block_size)
        for i in range(2):
            for j in range(3):
                assert_same_bits(got[i, j], dequantize(data[i, j], qtype), f"{name} row {i},{j}")

    def is_independent_of_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
        data = torch.from_numpy(finite_blocks(qtype, 37, seed=3)).reshape(-1)
        whole = {dt: dequantize(data, qtype, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        # Chunks of 2 blocks: 18 full chunks and a ragged last one (float32 is decoded into the
        # output, other dtypes through a reused scratch chunk: both paths).
        monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 2 * qt.block_size)
        for dt, want in whole.items():
            assert_same_bits(dequantize(data, qtype, dtype=dt), want, f"{name} chunked {dt}")

    def rejects_a_partial_block() -> None:
        data = torch.zeros(3, qt.type_size() + 1, dtype=torch.uint8)
        with pytest.raises(QuantizationError, match=name):
            dequantize(data, qtype)

    @pytest.mark.gpu
    def on_cuda_matches_cpu() -> None:
        data = torch.from_numpy(finite_blocks(qtype, 64, seed=11)).reshape(4, -1)
        want = dequantize(data, qtype)
        got = dequantize(data.cuda(), qtype)
        assert got.device.type == "cuda"
        assert_same_bits(got, want, f"{name} on CUDA")

    tests = {
        "matches_ggml_reference": matches_ggml_reference,
        "matches_gguf_py": matches_gguf_py,
        "half_output_is_float32_rounded_once": half_output_is_float32_rounded_once,
        "keeps_leading_dims": keeps_leading_dims,
        "is_independent_of_the_chunk_size": is_independent_of_the_chunk_size,
        "rejects_a_partial_block": rejects_a_partial_block,
        "on_cuda_matches_cpu": on_cuda_matches_cpu,
    }
    out = {}
    for suffix, fn in tests.items():
        test_name = f"test_{low}_{suffix}"
        fn.__name__ = fn.__qualname__ = test_name
        out[test_name] = fn
    return out
