"""GGUFFile: parsing real (gguf-py written) files, lazy metadata, and one test per header error."""

from __future__ import annotations

import gc
import struct
import weakref

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf_bytes import GGUFBuilder

from ggufvideo import (
    GGUFError,
    GGUFFile,
    InvalidHeaderError,
    TensorLayoutError,
    UnsupportedTypeError,
)


def _gguf_py_file(path, *, arch="wan"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("s", "hello")
    w.add_uint32("u32", 7)
    w.add_int64("i64", -5)
    w.add_float32("f32", 1.5)
    w.add_float64("f64", 2.25)
    w.add_bool("flag", True)
    w.add_array("ints", [1, 2, 3])
    w.add_array("strs", ["a", "bb", "ccc"])
    w.add_array("nested", [[1, 2], [3]])
    w.add_tensor("a", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("b", np.ones((3, 32), dtype=np.float16))
    q = gguf.quants.quantize(np.random.default_rng(0).standard_normal((2, 64), dtype=np.float32), T.Q8_0)
    w.add_tensor("c", q, raw_shape=q.shape, raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_gguf_py_file_like_gguf_py(tmp_path):
    path = _gguf_py_file(tmp_path / "m.gguf")
    ref = gguf.GGUFReader(str(path))
    with GGUFFile(path) as f:
        assert f.version == 3
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert info.qtype == t.tensor_type
            assert info.offset == t.data_offset
            assert info.nbytes == t.n_bytes
            assert info.shape == tuple(reversed([int(x) for x in t.shape]))
            assert bytes(f.tensor_data(info).flatten().numpy()) == bytes(np.asarray(t.data).tobytes())
        md = f.metadata
        assert md["general.architecture"] == "wan"
        assert md["s"] == "hello" and md["u32"] == 7 and md["i64"] == -5
        assert md["f32"] == 1.5 and md["f64"] == 2.25 and md["flag"] is True
        assert md["ints"].tolist() == [1, 2, 3]
        assert md["strs"] == ["a", "bb", "ccc"]
        assert [a.tolist() for a in md["nested"]] == [[1, 2], [3]]
        assert f.fields["strs"].count == 3 and f.fields["strs"].item_type == V.STRING


def test_metadata_arrays_are_not_decoded_at_open(tmp_path):
    n = 50_000
    path = GGUFBuilder().add("tokenizer.ggml.tokens", V.ARRAY, [f"t{i}" for i in range(n)], V.STRING) \
        .write(tmp_path / "vocab.gguf")
    f = GGUFFile(path)
    assert f.metadata._cache == {}  # nothing decoded by opening
    assert f.fields["tokenizer.ggml.tokens"].count == n
    assert f.metadata["tokenizer.ggml.tokens"][-1] == f"t{n - 1}"


def test_numeric_metadata_array_is_read_only(tmp_path):
    path = GGUFBuilder().add("xs", V.ARRAY, [1.0, 2.0], V.FLOAT32).write(tmp_path / "a.gguf")
    arr = GGUFFile(path).metadata["xs"]
    assert arr.dtype == np.float32 and not arr.flags.writeable


def test_an_unreferenced_file_is_released_at_once_and_its_metadata_outlives_it(tmp_path):
    # no reference cycle: the mapping and descriptor go with the last reference, not at the next
    # garbage collection (after a load to the GPU nothing else holds them)
    path = GGUFBuilder().add("general.architecture", V.STRING, "wan") \
        .tensor("w", T.F32, (4,), np.zeros(4, np.float32).tobytes()).write(tmp_path / "r.gguf")
    gc.disable()
    try:
        f = GGUFFile(path)
        md, gone = f.metadata, weakref.ref(f)
        del f
        assert gone() is None
        assert md["general.architecture"] == "wan"
    finally:
        gc.enable()


def test_version_2_is_supported(tmp_path):
    b = GGUFBuilder(version=2).tensor("w", T.F32, (2, 2), np.ones(4, np.float32).tobytes())
    f = GGUFFile(b.write(tmp_path / "v2.gguf"))
    assert f.version == 2 and f.tensors["w"].shape == (2, 2)


def test_custom_alignment_is_honoured(tmp_path):
    b = GGUFBuilder(alignment=64).add("general.alignment", V.UINT32, 64)
    b.tensor("a", T.F32, (3,), b"\0" * 12).tensor("b", T.F32, (1,), struct.pack("<f", 2.0))
    f = GGUFFile(b.write(tmp_path / "al.gguf"))
    assert f.alignment == 64 and (f.tensors["b"].offset - f.data_offset) == 64
    assert f.tensor_data("b").view(torch.float32).item() == 2.0


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "nope.gguf")


def test_not_a_gguf_file_raises_clear_error(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(InvalidHeaderError, match=r"x\.safetensors.*not a GGUF file.*magic"):
        GGUFFile(p)


def test_empty_file_raises_clear_error(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(InvalidHeaderError, match="empty"):
        GGUFFile(p)


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version_raises_clear_error(tmp_path, version):
    p = GGUFBuilder(version=version).write(tmp_path / "v.gguf")
    with pytest.raises(InvalidHeaderError, match=f"unsupported GGUF version {version}"):
        GGUFFile(p)


def test_big_endian_file_is_named_as_such(tmp_path):
    p = tmp_path / "be.gguf"
    p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(InvalidHeaderError, match="big-endian"):
        GGUFFile(p)


def test_truncated_file_raises_clear_error(tmp_path):
    full = GGUFBuilder().add("k", V.STRING, "value").tensor("w", T.F32, (4,), b"\0" * 16).build()
    for cut in (6, 20, 30, 40, 60):
        p = tmp_path / f"t{cut}.gguf"
        p.write_bytes(full[:cut])
        with pytest.raises(InvalidHeaderError, match="truncated"):
            GGUFFile(p)


@pytest.mark.parametrize("into, part", [(2, "n_dims"), (6, "dims, type and offset")])
def test_a_tensor_info_cut_short_names_the_tensor_and_its_field(tmp_path, into, part):
    name = "blk.0.a_long_enough_tensor_name.weight"  # so the count check passes
    full = GGUFBuilder().tensor(name, T.F32, (4,), b"\0" * 16).build()
    end_of_name = full.index(name.encode()) + len(name)
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[:end_of_name + into])
    with pytest.raises(InvalidHeaderError,
                       match=rf"truncated file: {part} of tensor '{name}' needs \d+ bytes"):
        GGUFFile(p)


def test_tensor_data_outside_the_file_raises_clear_error(tmp_path):
    data = GGUFBuilder().tensor("w", T.F32, (64,), b"\0" * 256).build()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[:-4])
    with pytest.raises(TensorLayoutError, match=r"tensor w: data .* outside the"):
        GGUFFile(p)


def test_misaligned_offset_raises_clear_error(tmp_path):
    b = GGUFBuilder().tensor("w", T.F32, (4,), b"\0" * 16, offset=4)
    with pytest.raises(TensorLayoutError, match=r"tensor w: data offset 4 is not a multiple of the alignment 32"):
        GGUFFile(b.write(tmp_path / "mis.gguf"))


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment_value_raises_clear_error(tmp_path, alignment):
    b = GGUFBuilder().add("general.alignment", V.UINT32, alignment)
    with pytest.raises(InvalidHeaderError, match="general.alignment must be a positive power of two"):
        GGUFFile(b.write(tmp_path / "al.gguf"))


def test_alignment_of_wrong_type_raises_clear_error(tmp_path):
    b = GGUFBuilder().add("general.alignment", V.STRING, "32")
    with pytest.raises(InvalidHeaderError, match="general.alignment"):
        GGUFFile(b.write(tmp_path / "al.gguf"))


def test_overlapping_tensors_raise_clear_error(tmp_path):
    b = GGUFBuilder().tensor("a", T.F32, (16,), b"\0" * 64, offset=0)
    b.tensor("b", T.F32, (16,), b"\0" * 64, offset=32)
    with pytest.raises(TensorLayoutError, match=r"tensor b: data .* overlaps tensor 'a'"):
        GGUFFile(b.write(tmp_path / "ov.gguf"))


def test_unknown_type_id_raises_clear_error(tmp_path):
    b = GGUFBuilder().tensor("w", 77, (32,), b"\0" * 32)
    with pytest.raises(UnsupportedTypeError, match=r"tensor w: unknown ggml type id 77"):
        GGUFFile(b.write(tmp_path / "ty.gguf"))


def test_unknown_metadata_value_type_raises_clear_error(tmp_path):
    raw = bytearray(GGUFBuilder().add("k", V.UINT8, 1).build())
    idx = raw.index(b"k") + 1
    raw[idx:idx + 4] = struct.pack("<I", 200)
    p = tmp_path / "vt.gguf"
    p.write_bytes(bytes(raw))
    with pytest.raises(InvalidHeaderError, match="unknown metadata value type 200"):
        GGUFFile(p)


def test_bad_element_count_raises_clear_error(tmp_path):
    b = GGUFBuilder().tensor("w", T.Q4_0, (2, 48), b"\0" * 54)
    with pytest.raises(TensorLayoutError, match=r"tensor w: row length 48 is not a multiple of the Q4_0 block size 32"):
        GGUFFile(b.write(tmp_path / "bc.gguf"))


def test_duplicate_tensor_names_raise_clear_error(tmp_path):
    b = GGUFBuilder().tensor("w", T.F32, (8,), b"\0" * 32).tensor("w", T.F32, (8,), b"\0" * 32)
    with pytest.raises(TensorLayoutError, match="tensor w: duplicate tensor name"):
        GGUFFile(b.write(tmp_path / "dup.gguf"))


def test_duplicate_metadata_keys_raise_clear_error(tmp_path):
    b = GGUFBuilder().add("k", V.UINT8, 1).add("k", V.UINT8, 2)
    with pytest.raises(InvalidHeaderError, match="duplicate metadata key 'k'"):
        GGUFFile(b.write(tmp_path / "dupk.gguf"))


def test_huge_counts_are_refused_before_allocation(tmp_path):
    p = tmp_path / "huge.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0) + b"\0" * 64)
    with pytest.raises(InvalidHeaderError, match="tensor count .* cannot fit"):
        GGUFFile(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62) + b"\0" * 64)
    with pytest.raises(InvalidHeaderError, match="metadata count .* cannot fit"):
        GGUFFile(p)


def test_huge_array_count_is_refused(tmp_path):
    raw = GGUFBuilder().build()[:24]
    body = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", V.ARRAY, V.STRING, 2**60)
    p = tmp_path / "arr.gguf"
    p.write_bytes(raw[:16] + struct.pack("<Q", 1) + body + b"\0" * 16)
    with pytest.raises(InvalidHeaderError, match="cannot fit"):
        GGUFFile(p)


def test_too_many_dims_raise_clear_error(tmp_path):
    b = GGUFBuilder().tensor("w", T.F32, (1,) * 20, b"\0" * 4)
    with pytest.raises(InvalidHeaderError, match="tensor w: n_dims 20 exceeds"):
        GGUFFile(b.write(tmp_path / "dims.gguf"))


def test_deeply_nested_arrays_are_refused(tmp_path):
    inner: tuple = (V.UINT8, [1])
    for _ in range(40):
        inner = (V.ARRAY, [inner])
    b = GGUFBuilder().add("deep", V.ARRAY, inner[1], inner[0])
    with pytest.raises(InvalidHeaderError, match="nested deeper"):
        GGUFFile(b.write(tmp_path / "deep.gguf"))


def test_errors_are_value_errors_naming_the_file(tmp_path):
    p = tmp_path / "named.gguf"
    p.write_bytes(b"nope")
    with pytest.raises(GGUFError) as ei:
        GGUFFile(p)
    assert isinstance(ei.value, ValueError) and ei.value.path == str(p) and str(p) in str(ei.value)


def test_control_characters_in_names_are_escaped_in_errors(tmp_path):
    b = GGUFBuilder().tensor("bad\x1b[31mname", 77, (32,), b"\0" * 32)
    with pytest.raises(UnsupportedTypeError) as ei:
        GGUFFile(b.write(tmp_path / "esc.gguf"))
    assert "\x1b" not in str(ei.value) and "\\x1b" in str(ei.value)


def test_zero_dim_and_empty_tensors(tmp_path):
    b = GGUFBuilder().tensor("scalar", T.F32, (), struct.pack("<f", 3.0)).tensor("empty", T.F32, (0, 4), b"")
    f = GGUFFile(b.write(tmp_path / "z.gguf"))
    assert f.tensors["scalar"].shape == () and f.tensors["empty"].nbytes == 0
    assert f.tensor_data("empty").numel() == 0


def test_close_never_invalidates_tensor_views(tmp_path):
    b = GGUFBuilder().tensor("w", T.F32, (4,), np.arange(4, dtype=np.float32).tobytes())
    f = GGUFFile(b.write(tmp_path / "c.gguf"))
    view = f.tensor_data("w")
    f.close()
    assert view.view(torch.float32).tolist() == [0.0, 1.0, 2.0, 3.0]
    with GGUFFile(tmp_path / "c.gguf") as g:
        kept = g.tensor_data("w")
    assert kept.view(torch.float32).sum().item() == 6.0
