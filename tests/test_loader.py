"""load_state_dict: eager and lazy, dtypes, devices, >4-D restoration, zero-copy, never writes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf_bytes import GGUFBuilder

from ggufvideo import GGMLTensor, GGUFFile, ShapeMetadataError, dequantize, load_state_dict
from ggufvideo.loader import resolve_dtype

RNG = np.random.default_rng(1234)
PATCH = (64, 16, 1, 2, 2)  # a Wan patch_embedding-like Conv3d weight, scaled down


def _q(x: np.ndarray, qtype: T) -> np.ndarray:
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def _write(path, tensors, kv=()):
    w = gguf.GGUFWriter(str(path), "wan")
    for key, v in kv:
        w.add_array(key, v) if isinstance(v, list) else w.add_string(key, v)
    for name, arr, qtype in tensors:
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            q = _q(arr, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model_file(tmp_path):
    w32 = RNG.standard_normal((8, 64), dtype=np.float32)
    tensors = [
        ("f32", w32, None),
        ("f16", RNG.standard_normal((4, 32)).astype(np.float16), None),
        ("ids", np.arange(10, dtype=np.int32), None),
        ("q8", RNG.standard_normal((16, 64), dtype=np.float32), T.Q8_0),
        ("q4", RNG.standard_normal((16, 64), dtype=np.float32), T.Q4_0),
    ]
    return _write(tmp_path / "m.gguf", tensors), {n: a for n, a, _ in tensors}


def test_eager_decodes_every_tensor_to_plain_tensors(model_file):
    path, src = model_file
    sd = load_state_dict(path)
    assert all(type(t) is torch.Tensor for t in sd.values())
    assert sd["f32"].dtype == torch.float32 and torch.equal(sd["f32"], torch.from_numpy(src["f32"]))
    assert sd["f16"].dtype == torch.float16
    assert sd["ids"].dtype == torch.int32 and sd["ids"].tolist() == list(range(10))
    assert sd["q8"].dtype == torch.float32 and sd["q8"].shape == (16, 64)
    ref = gguf.quants.dequantize(_q(src["q8"], T.Q8_0), T.Q8_0)
    assert np.array_equal(sd["q8"].numpy(), ref)


def test_eager_tensors_own_their_memory(model_file):
    path, _ = model_file
    sd = load_state_dict(path)
    sd["f32"].add_(1)  # writable, and not a view of the mapping
    assert sd["f32"].untyped_storage().nbytes() == sd["f32"].nbytes


def test_lazy_keeps_quantized_tensors_as_ggml_tensors(model_file):
    path, src = model_file
    sd = load_state_dict(path, lazy=True)
    assert isinstance(sd["q8"], GGMLTensor) and sd["q8"].qtype == T.Q8_0
    assert sd["q8"].shape == (16, 64) and sd["q8"].dtype == torch.float32
    assert type(sd["f32"]) is torch.Tensor and type(sd["ids"]) is torch.Tensor
    eager = load_state_dict(path)
    for k in ("q8", "q4"):
        assert torch.equal(sd[k].dequantize(), eager[k])


def test_lazy_tensors_are_zero_copy_views_of_the_file(model_file):
    path, _ = model_file
    sd = load_state_dict(path, lazy=True)
    infos = GGUFFile(path).tensors
    # Views into one mapping: their addresses differ exactly as their file offsets do.
    base = sd["f32"].data_ptr() - infos["f32"].offset
    assert sd["f16"].data_ptr() - infos["f16"].offset == base
    assert sd["q8"].raw.data_ptr() - infos["q8"].offset == base
    assert sd["q4"].raw.data_ptr() - infos["q4"].offset == base


@pytest.mark.parametrize("name,expected", [("float32", torch.float32), ("float16", torch.float16),
                                           ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                           (torch.bfloat16, torch.bfloat16)])
def test_dtype_converts_every_floating_tensor(model_file, name, expected):
    path, _ = model_file
    for lazy in (False, True):
        sd = load_state_dict(path, lazy=lazy, dtype=name)
        assert {sd[k].dtype for k in ("f32", "f16", "q8", "q4")} == {expected}
        assert sd["ids"].dtype == torch.int32


def test_bf16_eager_is_the_exact_value_rounded_once(model_file):
    path, _ = model_file
    exact = load_state_dict(path)["q4"]
    assert torch.equal(load_state_dict(path, dtype="bfloat16")["q4"], exact.to(torch.bfloat16))


def test_auto_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="floating"):
        resolve_dtype(torch.int8)


def test_native_nd_tensor_is_restored(tmp_path):
    w = RNG.standard_normal(PATCH, dtype=np.float32)
    path = _write(tmp_path / "n.gguf", [("patch", w, None)])
    for lazy in (False, True):
        assert torch.equal(load_state_dict(path, lazy=lazy)["patch"], torch.from_numpy(w))


@pytest.mark.parametrize("convention", ["comfy", "raw_shape"])
@pytest.mark.parametrize("qtype", [None, T.Q8_0, T.F16])
def test_flattened_tensor_is_restored_from_shape_metadata(tmp_path, convention, qtype):
    w = RNG.standard_normal(PATCH, dtype=np.float32)
    if convention == "comfy":
        stored, key = w.reshape(-1, 256), "comfy.gguf.orig_shape.patch"
    else:
        stored, key = w.reshape(1, -1), "patch.raw_shape"
    if qtype == T.F16:
        stored, qtype = stored.astype(np.float16), None
    path = _write(tmp_path / "c.gguf", [("patch", stored, qtype)], kv=[(key, list(PATCH))])
    eager = load_state_dict(path)["patch"]
    lazy = load_state_dict(path, lazy=True)["patch"]
    assert eager.shape == PATCH and lazy.shape == PATCH
    ref = stored if qtype is None else gguf.quants.dequantize(_q(stored, qtype), qtype)
    assert np.array_equal(eager.numpy(), np.asarray(ref).reshape(PATCH))
    got = lazy.dequantize() if isinstance(lazy, GGMLTensor) else lazy
    assert torch.equal(got, eager)


def test_shape_metadata_with_wrong_element_count_raises(tmp_path):
    b = GGUFBuilder().add("w.raw_shape", V.ARRAY, [3, 3], V.INT32).tensor("w", T.F32, (8,), b"\0" * 32)
    with pytest.raises(ShapeMetadataError, match=r"tensor w: metadata 'w.raw_shape' gives shape \[3, 3\] \(9 elements\).*8 elements"):
        load_state_dict(b.write(tmp_path / "s.gguf"))


def test_shape_metadata_of_wrong_type_raises(tmp_path):
    b = GGUFBuilder().add("comfy.gguf.orig_shape.w", V.STRING, "2,4").tensor("w", T.F32, (8,), b"\0" * 32)
    with pytest.raises(ShapeMetadataError, match="tensor w: metadata 'comfy.gguf.orig_shape.w' must be an array of integers, found STRING"):
        load_state_dict(b.write(tmp_path / "s.gguf"), lazy=True)
    b = GGUFBuilder().add("w.raw_shape", V.ARRAY, [2.0, 4.0], V.FLOAT32).tensor("w", T.F32, (8,), b"\0" * 32)
    with pytest.raises(ShapeMetadataError, match="ARRAY of FLOAT32"):
        load_state_dict(b.write(tmp_path / "s2.gguf"))


def test_negative_shape_metadata_raises(tmp_path):
    b = GGUFBuilder().add("w.raw_shape", V.ARRAY, [-2, -4], V.INT32).tensor("w", T.F32, (8,), b"\0" * 32)
    with pytest.raises(ShapeMetadataError, match="not a valid shape"):
        load_state_dict(b.write(tmp_path / "s.gguf"))


def test_conflicting_shape_metadata_raises(tmp_path):
    b = GGUFBuilder().add("w.raw_shape", V.ARRAY, [2, 4], V.INT32) \
        .add("comfy.gguf.orig_shape.w", V.ARRAY, [4, 2], V.INT32).tensor("w", T.F32, (8,), b"\0" * 32)
    with pytest.raises(ShapeMetadataError, match="conflicting shape metadata"):
        load_state_dict(b.write(tmp_path / "s.gguf"))


def test_loading_never_modifies_the_file(model_file):
    path, _ = model_file
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = load_state_dict(path, lazy=True)
    sd["f32"].add_(1.0)  # a write through a lazy view lands in private pages
    sd["q8"].raw.fill_(0)
    del sd
    load_state_dict(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_lazy_load_of_a_large_file_costs_no_ram(tmp_path):
    """Loading a 256 MiB file lazily must not make it resident (checked in a fresh process)."""
    n_rows = 256 * 1024 * 1024 // 34 // 32 * 32 // 32  # rows of 1024 Q8_0 elements
    rows = (n_rows // 32) * 32
    path = tmp_path / "big.gguf"
    b = GGUFBuilder().tensor("w", T.Q8_0, (rows, 1024), b"")
    raw = b.build()
    # Header only: then extend to the data size with a sparse region (fast, no real writes).
    with open(path, "wb") as f:
        f.write(raw)
        f.truncate(len(raw) + rows * 1024 // 32 * 34)
    code = textwrap.dedent(f"""
        import resource, ggufvideo
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sd = ggufvideo.load_state_dict({str(path)!r}, lazy=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024, sd["w"].raw.nbytes // 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew_mib, size_mib = map(int, out.stdout.split())
    assert size_mib >= 200 and grew_mib < 16


def test_device_argument_moves_tensors(model_file):
    path, _ = model_file
    sd = load_state_dict(path, lazy=True, device="meta")
    assert sd["q8"].device.type == "meta" and isinstance(sd["q8"], GGMLTensor)
    assert sd["f32"].device.type == "meta"


@pytest.mark.gpu
def test_cuda_lazy_and_eager_match_cpu(model_file):
    path, _ = model_file
    cpu = load_state_dict(path)
    for lazy in (False, True):
        sd = load_state_dict(path, lazy=lazy, device="cuda")
        for k, v in sd.items():
            got = v.dequantize() if isinstance(v, GGMLTensor) else v
            assert got.is_cuda and torch.equal(got.cpu(), cpu[k])


def test_dequantize_accepts_names_and_row_batches(model_file):
    path, _ = model_file
    sd = load_state_dict(path, lazy=True)
    raw = sd["q8"].raw
    assert torch.equal(dequantize(raw, "q8_0"), dequantize(raw, T.Q8_0))
    assert dequantize(raw.reshape(2, 8, -1), T.Q8_0).shape == (2, 8, 64)
