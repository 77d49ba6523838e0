"""ggufvideo.runtime._cudart: the libcudart lookup and its error messages."""

from __future__ import annotations

import pytest
import torch

from ggufvideo.runtime import _cudart


def test_lib_is_the_loaded_runtime_or_none():
    rt = _cudart.lib()
    if torch.version.cuda is None:
        assert rt is None  # a CPU build of torch loads no libcudart
    if rt is not None:
        assert rt.cudaMemcpyAsync.argtypes and rt.cudaGetErrorString.restype is not None


def test_check_names_the_call_and_the_error():
    _cudart.check(0, "cudaEventRecord")  # success: nothing
    with pytest.raises(_cudart.CudaError, match=r"cudaMemcpyAsync \(host to device\) failed: .+ "
                                                r"\(cudaError 1\)"):
        _cudart.check(1, "cudaMemcpyAsync (host to device)")


def test_torchs_runtime_is_preferred_over_another_packages():
    other = "/env/lib/python3.12/site-packages/cupy_backends/libcudart.so.12"
    wheel = "/env/lib/python3.12/site-packages/nvidia/cu13/lib/libcudart.so.13"
    bundled = "/env/lib/python3.12/site-packages/torch/lib/libcudart-abc.so.12"
    torch_dir = "/env/lib/python3.12/site-packages/torch"
    assert _cudart.prefer_torchs([other, wheel], torch_dir) == wheel
    assert _cudart.prefer_torchs([other, bundled], torch_dir) == bundled
    assert _cudart.prefer_torchs([other], torch_dir) == other
