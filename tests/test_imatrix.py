"""Importance matrices: llama.cpp's two file formats, their errors, and their use by convert()."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from ggufvideo import GGUFFile, quantize
from ggufvideo.convert import convert
from ggufvideo.errors import GGUFError
from ggufvideo.imatrix import (
    IMATRIX_METADATA_KEYS,
    USES_IMATRIX,
    Imatrix,
    ImatrixError,
    load_imatrix,
)
from ggufvideo.writer import TensorEntry, TypedValue, save_state_dict, write_gguf

safetensors_torch = pytest.importorskip("safetensors.torch")


# -- writing the two formats as llama.cpp's imatrix tool does ----------------------------------


def _legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], chunks: int | None = None,
                  dataset: str | None = None) -> bytes:
    """The legacy .dat layout: count, then (name, ncall, nval, values) per entry, then a trailer."""
    out = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        vals = np.asarray(values, dtype="<f4")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, vals.size),
                vals.tobytes()]
    if chunks is not None:
        out.append(struct.pack("<i", chunks))
        if dataset is not None:
            out += [struct.pack("<i", len(dataset.encode())), dataset.encode()]
    return b"".join(out)


def _write_legacy(path, entries, chunks=None, dataset=None):
    path.write_bytes(_legacy_bytes(entries, chunks, dataset))
    return path


def _f32_entry(name: str, values: np.ndarray) -> TensorEntry:
    arr = np.ascontiguousarray(values, dtype=np.float32)
    return TensorEntry(name, T.F32, tuple(arr.shape), lambda a=arr: [a.tobytes()])


def _write_gguf_imatrix(path, entries: dict[str, tuple[np.ndarray, np.ndarray]],
                        datasets=("calib.txt",), chunks: int = 10, extra=(), metadata=None):
    """GGUF imatrix: ``<name>.in_sum2`` [n_mat, n] and ``<name>.counts`` [n_mat, 1] (F32)."""
    tensors = []
    for name, (sums, counts) in entries.items():
        tensors.append(_f32_entry(name + ".in_sum2", sums))
        tensors.append(_f32_entry(name + ".counts", counts))
    tensors.extend(extra)
    meta = {"general.type": "imatrix",
            "imatrix.datasets": list(datasets),
            "imatrix.chunk_count": TypedValue(GGUFValueType.UINT32, chunks),
            "imatrix.chunk_size": TypedValue(GGUFValueType.UINT32, 512)}
    if metadata is not None:
        meta = metadata
    write_gguf(path, tensors, meta, overwrite=True)
    return path


def _rng(seed=0):
    return np.random.default_rng(seed)


# -- reading ------------------------------------------------------------------------------------


def test_legacy_imatrix_weights_are_stored_values_over_ncall_in_float32(tmp_path):
    vals = _rng().uniform(0, 50, 512).astype(np.float32)
    p = _write_legacy(tmp_path / "m.dat", {"blk.0.w": (7, vals), "blk.1.w": (0, vals[:256])},
                      chunks=7, dataset="wiki.train.raw")
    m = load_imatrix(p)
    assert m.format == "legacy" and m.chunks == 7 and m.datasets == ("wiki.train.raw",)
    assert np.array_equal(m.entries["blk.0.w"].numpy(), vals / np.float32(7))
    assert np.array_equal(m.entries["blk.1.w"].numpy(), vals[:256])  # ncall 0: as stored


def test_legacy_imatrix_without_trailer_reads(tmp_path):
    p = _write_legacy(tmp_path / "m.dat", {"a": (1, np.ones(32))})
    m = load_imatrix(p)
    assert m.chunks == 0 and m.datasets == () and len(m) == 1


def test_gguf_imatrix_weights_are_in_sum2_over_counts_per_matrix(tmp_path):
    sums = _rng(1).uniform(0, 100, (3, 256)).astype(np.float32)
    counts = np.array([[512.0], [0.0], [3.0]], dtype=np.float32)
    one = _rng(2).uniform(0, 9, 256).astype(np.float32)  # one matrix: ggml writes it 1-D
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"experts.w": (sums, counts),
                                                  "attn.q.weight": (one, np.array([4.0]))},
                            datasets=("a.txt", "b.txt"), chunks=12,
                            extra=[_f32_entry("attn.q.weight.in_sum", one)])
    m = load_imatrix(p)
    assert m.format == "gguf" and m.chunks == 12 and m.datasets == ("a.txt", "b.txt")
    got = m.entries["experts.w"].numpy().reshape(3, 256)
    assert np.array_equal(got[0], sums[0] / np.float32(512))
    assert np.array_equal(got[1], np.ones(256, np.float32))  # an expert never reached: 1
    assert np.array_equal(got[2], sums[2] / np.float32(3))
    assert np.array_equal(m.entries["attn.q.weight"].numpy(), one / np.float32(4))
    assert set(m.entries) == {"experts.w", "attn.q.weight"}  # .in_sum is not an entry


def test_rename_rules_map_entry_names(tmp_path):
    p = _write_legacy(tmp_path / "m.dat", {"blocks.0.q.weight": (1, np.ones(32))})
    m = load_imatrix(p).renamed([("^", "model.diffusion_model.")])
    assert list(m.entries) == ["model.diffusion_model.blocks.0.q.weight"]
    back = m.renamed({r"^model\.diffusion_model\.": ""})
    assert list(back.entries) == ["blocks.0.q.weight"]


def test_weights_for_a_tensor_of_another_row_length_is_a_clear_error(tmp_path):
    p = _write_legacy(tmp_path / "m.dat", {"w": (1, np.ones(96))})
    with pytest.raises(ImatrixError, match=r"tensor w: .*96 values, expected 256") as e:
        load_imatrix(p).weights_for("w", (8, 256))
    assert str(p) in str(e.value)


def test_weights_for_a_3d_tensor_accept_one_vector_per_matrix(tmp_path):
    p = _write_legacy(tmp_path / "m.dat", {"e": (1, np.arange(3 * 32)), "s": (1, np.ones(32))})
    m = load_imatrix(p)
    assert m.weights_for("e", (3, 4, 32)).shape == (3, 32)
    assert m.weights_for("s", (3, 4, 32)).shape == (1, 32)
    assert m.weights_for("absent", (3, 4, 32)) is None


def test_metadata_uses_llama_cpp_keys_and_types(tmp_path):
    p = _write_legacy(tmp_path / "m.dat", {"a": (1, np.ones(32))}, chunks=5, dataset="d.txt")
    meta = load_imatrix(p).metadata()
    assert meta["quantize.imatrix.file"] == str(p)
    assert meta["quantize.imatrix.dataset"] == "d.txt"
    assert meta["quantize.imatrix.entries_count"] == TypedValue(GGUFValueType.UINT32, 1)
    assert meta["quantize.imatrix.chunks_count"] == TypedValue(GGUFValueType.UINT32, 5)
    assert set(IMATRIX_METADATA_KEYS.values()) == set(meta)


def test_types_using_the_imatrix_are_the_ones_ggml_weights():
    x = torch.from_numpy(_rng(3).standard_normal((4, 256)).astype(np.float32))
    w = torch.from_numpy(_rng(4).uniform(0, 10, 256).astype(np.float32))
    for qtype in ("Q4_0", "Q5_1", "Q2_K", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q8_0", "F16"):
        same = torch.equal(quantize(x, qtype), quantize(x, qtype, imatrix=w))
        assert same == (T[qtype] not in USES_IMATRIX), qtype


# -- bad files: one test per promised error ----------------------------------------------------


def _legacy_error(tmp_path, data: bytes, match: str) -> ImatrixError:
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    with pytest.raises(ImatrixError, match=match) as e:
        load_imatrix(p)
    assert isinstance(e.value, GGUFError) and str(p) in str(e.value)
    return e.value


def test_legacy_file_too_short_for_the_count_is_refused(tmp_path):
    _legacy_error(tmp_path, b"\x01\x00", "too short")


def test_legacy_file_with_no_entries_is_refused(tmp_path):
    _legacy_error(tmp_path, struct.pack("<i", 0), "0 entries")


def test_legacy_entry_count_the_file_cannot_hold_is_refused(tmp_path):
    _legacy_error(tmp_path, struct.pack("<i", 1 << 30) + b"\0" * 40, "impossible")


def test_legacy_truncated_name_is_refused(tmp_path):
    data = _legacy_bytes({"a": (1, np.ones(32)), "blk.0.attn_q.weight": (1, np.ones(32))})
    first = 4 + (4 + 1 + 8 + 4 * 32)
    _legacy_error(tmp_path, data[:first + 4 + 5], "truncated: .*name of entry 2")


def test_legacy_truncated_values_are_refused(tmp_path):
    data = _legacy_bytes({"a": (1, np.ones(32)), "b": (1, np.ones(64))})
    _legacy_error(tmp_path, data[:-8], r"truncated: .*64 values of entry 2")


def test_legacy_non_positive_value_count_is_refused(tmp_path):
    data = struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 0)
    _legacy_error(tmp_path, data + b"\0" * 8, "0 values")


def test_legacy_negative_name_length_is_refused(tmp_path):
    _legacy_error(tmp_path, struct.pack("<ii", 1, -5) + b"\0" * 20, "name length -5")


def test_legacy_name_that_is_not_utf8_is_refused(tmp_path):
    data = struct.pack("<ii", 1, 2) + b"\xff\xfe" + struct.pack("<ii", 1, 1) + b"\0" * 4
    _legacy_error(tmp_path, data, "not UTF-8")


def test_legacy_duplicate_entry_is_refused(tmp_path):
    one = _legacy_bytes({"a": (1, np.ones(4))})[4:]
    _legacy_error(tmp_path, struct.pack("<i", 2) + one + one, "appears twice")


def test_legacy_partial_trailer_is_refused(tmp_path):
    _legacy_error(tmp_path, _legacy_bytes({"a": (1, np.ones(4))}) + b"\x01\x00",
                  "too few for the chunk count")


def test_legacy_bytes_after_the_dataset_name_are_refused(tmp_path):
    data = _legacy_bytes({"a": (1, np.ones(4))}, chunks=3, dataset="d") + b"junk"
    _legacy_error(tmp_path, data, "unexpected byte")


def test_legacy_truncated_dataset_name_is_refused(tmp_path):
    data = _legacy_bytes({"a": (1, np.ones(4))}, chunks=3, dataset="dataset.txt")
    _legacy_error(tmp_path, data[:-3], "truncated: .*dataset name")


def test_negative_weight_is_refused(tmp_path):
    _legacy_error(tmp_path, _legacy_bytes({"a": (1, np.array([1.0, -2.0]))}), "tensor a: .*>= 0")


def test_non_finite_weight_is_refused(tmp_path):
    _legacy_error(tmp_path, _legacy_bytes({"a": (1, np.array([np.nan, 1.0]))}), "finite")


def _gguf_error(path, match: str) -> ImatrixError:
    with pytest.raises(ImatrixError, match=match) as e:
        load_imatrix(path)
    assert isinstance(e.value, GGUFError) and str(path) in str(e.value)
    return e.value


def test_gguf_model_file_is_not_an_imatrix(tmp_path):
    p = tmp_path / "model.gguf"
    save_state_dict({"w": torch.ones(4, 32)}, p)
    _gguf_error(p, "no '<name>.in_sum2'")


def test_gguf_truncated_file_is_refused(tmp_path):
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"a": (np.ones((1, 32)), np.ones((1, 1)))})
    p.write_bytes(p.read_bytes()[:60])
    _gguf_error(p, "not a readable imatrix GGUF")


def test_gguf_sums_without_counts_are_refused(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p, [_f32_entry("a.in_sum2", np.ones((1, 32)))], {"general.type": "imatrix"})
    _gguf_error(p, r"tensor a: .*no matching '\.counts'")


def test_gguf_sums_that_are_not_f32_are_refused(tmp_path):
    p = tmp_path / "m.gguf"
    half = np.ones((1, 32), dtype=np.float16)
    write_gguf(p, [TensorEntry("a.in_sum2", T.F16, (1, 32), lambda: [half.tobytes()]),
                   _f32_entry("a.counts", np.ones((1, 1)))], {"general.type": "imatrix"})
    _gguf_error(p, "is F16, expected F32")


def test_gguf_counts_of_the_wrong_shape_are_refused(tmp_path):
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"a": (np.ones((2, 32)), np.ones((3, 1)))})
    _gguf_error(p, r"counts has shape \[3, 1\], expected \[2, 1\]")


def test_gguf_sums_of_too_many_dims_are_refused(tmp_path):
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"a": (np.ones((2, 2, 32)), np.ones((2, 1)))})
    _gguf_error(p, "in_sum2 has shape")


def test_gguf_negative_counts_are_refused(tmp_path):
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"a": (np.ones((1, 32)), -np.ones((1, 1)))})
    _gguf_error(p, "counts .* must be finite and >= 0")


def test_gguf_datasets_of_the_wrong_type_are_refused(tmp_path):
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"a": (np.ones((1, 32)), np.ones((1, 1)))},
                            metadata={"imatrix.datasets": 3})
    _gguf_error(p, "imatrix.datasets is not an array of strings")


def test_gguf_chunk_count_of_the_wrong_type_is_refused(tmp_path):
    p = _write_gguf_imatrix(tmp_path / "m.gguf", {"a": (np.ones((1, 32)), np.ones((1, 1)))},
                            metadata={"imatrix.chunk_count": "many"})
    _gguf_error(p, "chunk_count is 'many'")


def test_folder_is_refused(tmp_path):
    with pytest.raises(ImatrixError, match="is a folder"):
        load_imatrix(tmp_path)


def test_rename_rule_that_is_not_a_regex_is_refused(tmp_path):
    m = load_imatrix(_write_legacy(tmp_path / "m.dat", {"a": (1, np.ones(4))}))
    with pytest.raises(ImatrixError, match="not a regular expression"):
        m.renamed([("(", "")])


def test_rename_making_two_entries_one_is_refused(tmp_path):
    m = load_imatrix(_write_legacy(tmp_path / "m.dat", {"x.a": (1, np.ones(4)),
                                                        "y.a": (1, np.ones(4))}))
    with pytest.raises(ImatrixError, match="both renamed to 'a'"):
        m.renamed([(r"^[xy]\.", "")])


# -- convert() with an imatrix ------------------------------------------------------------------


def _source(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.attn.q.weight": torch.randn(64, 256, generator=g),
          "blocks.0.ffn.0.weight": torch.randn(96, 512, generator=g),
          "blocks.0.ffn.2.weight": torch.randn(64, 256, generator=g),
          "blocks.0.attn.q.bias": torch.randn(64, generator=g)}
    p = tmp_path / "m.safetensors"
    safetensors_torch.save_file(sd, p)
    return p, sd


def _imatrix_for(tmp_path, names_and_sizes, seed=5, fmt="gguf"):
    rng = _rng(seed)
    vals = {n: rng.uniform(0, 20, k).astype(np.float32) for n, k in names_and_sizes.items()}
    if fmt == "gguf":
        p = _write_gguf_imatrix(tmp_path / "im.gguf",
                                {n: (v.reshape(1, -1) * 16, np.full((1, 1), 16, np.float32))
                                 for n, v in vals.items()}, chunks=4)
    else:
        p = _write_legacy(tmp_path / "im.dat", {n: (2, v * 2) for n, v in vals.items()},
                          chunks=4, dataset="calib.txt")
    return p, {n: torch.from_numpy(v) for n, v in vals.items()}


def _stored(path, name):
    with GGUFFile(path) as g:
        info = g.tensors[name]
        return info.qtype, g.tensor_data(info).clone()


@pytest.mark.parametrize("fmt", ["gguf", "legacy"])
def test_convert_with_imatrix_writes_the_bytes_quantize_gives_with_it(tmp_path, fmt):
    src, sd = _source(tmp_path)
    imat, weights = _imatrix_for(tmp_path, {"blocks.0.attn.q.weight": 256,
                                            "blocks.0.ffn.0.weight": 512}, fmt=fmt)
    dst = tmp_path / "out.gguf"
    s = convert(src, dst, qtype="Q4_K", imatrix=imat)
    assert sorted(s.imatrix_used) == ["blocks.0.attn.q.weight", "blocks.0.ffn.0.weight"]
    assert "imatrix: 2 tensor(s) quantized with importance weights" in str(s)
    for name in ("blocks.0.attn.q.weight", "blocks.0.ffn.0.weight"):
        qtype, data = _stored(dst, name)
        assert qtype == T.Q4_K
        assert torch.equal(data, quantize(sd[name], "Q4_K", imatrix=weights[name]))
        assert not torch.equal(data, quantize(sd[name], "Q4_K"))
    qtype, data = _stored(dst, "blocks.0.ffn.2.weight")  # no entry: quantized without
    assert torch.equal(data, quantize(sd["blocks.0.ffn.2.weight"], "Q4_K"))


def test_convert_with_imatrix_matches_ggml(tmp_path, oracle):
    src, sd = _source(tmp_path)
    imat, weights = _imatrix_for(tmp_path, {"blocks.0.ffn.0.weight": 512})
    convert(src, tmp_path / "out.gguf", qtype="Q4_K", imatrix=imat)
    _, data = _stored(tmp_path / "out.gguf", "blocks.0.ffn.0.weight")
    want = oracle.quantize(sd["blocks.0.ffn.0.weight"].numpy(), T.Q4_K,
                           weights["blocks.0.ffn.0.weight"].numpy())
    assert np.array_equal(data.numpy(), want)


def test_convert_records_imatrix_metadata_like_llama_cpp(tmp_path):
    src, _ = _source(tmp_path)
    imat, _ = _imatrix_for(tmp_path, {"blocks.0.attn.q.weight": 256}, fmt="legacy")
    convert(src, tmp_path / "out.gguf", qtype="Q4_K", imatrix=imat)
    with GGUFFile(tmp_path / "out.gguf") as g:
        assert g.metadata["quantize.imatrix.file"] == str(imat)
        assert g.metadata["quantize.imatrix.dataset"] == "calib.txt"
        assert g.metadata["quantize.imatrix.entries_count"] == 1
        assert g.metadata["quantize.imatrix.chunks_count"] == 4
        assert g.fields["quantize.imatrix.entries_count"].type == GGUFValueType.UINT32
        assert g.fields["quantize.imatrix.chunks_count"].type == GGUFValueType.UINT32


def test_convert_ignores_the_imatrix_for_types_that_do_not_use_it(tmp_path):
    src, sd = _source(tmp_path)
    imat, _ = _imatrix_for(tmp_path, {"blocks.0.attn.q.weight": 256})
    s = convert(src, tmp_path / "out.gguf", qtype="Q8_0", imatrix=imat)
    assert s.imatrix_used == [] and "imatrix: 0 tensor(s)" in str(s)
    _, data = _stored(tmp_path / "out.gguf", "blocks.0.attn.q.weight")
    assert torch.equal(data, quantize(sd["blocks.0.attn.q.weight"], "Q8_0"))


def test_convert_with_an_entry_of_the_wrong_length_fails_before_writing(tmp_path):
    src, _ = _source(tmp_path)
    imat, _ = _imatrix_for(tmp_path, {"blocks.0.ffn.0.weight": 256})
    with pytest.raises(ImatrixError, match=r"tensor blocks\.0\.ffn\.0\.weight: .*256 values, "
                                           r"expected 512"):
        convert(src, tmp_path / "out.gguf", qtype="Q4_K", imatrix=imat)
    assert not any(tmp_path.glob("out.gguf*"))


def test_convert_maps_prefixed_imatrix_names_with_rename_rules(tmp_path):
    src, sd = _source(tmp_path)
    imat, weights = _imatrix_for(tmp_path, {"model.diffusion_model.blocks.0.attn.q.weight": 256})
    s = convert(src, tmp_path / "a.gguf", qtype="Q4_K", imatrix=imat)
    assert s.imatrix_used == [] and any("name no tensor" in n for n in s.notes)
    s = convert(src, tmp_path / "b.gguf", qtype="Q4_K", imatrix=imat,
                imatrix_rename=[(r"^model\.diffusion_model\.", "")])
    assert s.imatrix_used == ["blocks.0.attn.q.weight"]
    _, data = _stored(tmp_path / "b.gguf", "blocks.0.attn.q.weight")
    w = weights["model.diffusion_model.blocks.0.attn.q.weight"]
    assert torch.equal(data, quantize(sd["blocks.0.attn.q.weight"], "Q4_K", imatrix=w))


def test_convert_quantizes_each_matrix_of_a_3d_tensor_with_its_own_weights(tmp_path):
    g = torch.Generator().manual_seed(2)
    experts = torch.randn(3, 8, 256, generator=g)
    src = tmp_path / "moe.safetensors"
    safetensors_torch.save_file({"moe.experts.weight": experts}, src)
    per = torch.from_numpy(_rng(6).uniform(0, 5, (3, 256)).astype(np.float32))
    imat = Imatrix(str(tmp_path / "mem"), "gguf", {"moe.experts.weight": per.reshape(-1)})
    s = convert(src, tmp_path / "out.gguf", qtype="Q4_K", imatrix=imat)
    assert s.imatrix_used == ["moe.experts.weight"]
    _, data = _stored(tmp_path / "out.gguf", "moe.experts.weight")
    for e in range(3):
        assert torch.equal(data[e], quantize(experts[e], "Q4_K", imatrix=per[e])), e


def test_convert_replaces_a_requantized_sources_imatrix_metadata(tmp_path):
    old = tmp_path / "old.gguf"
    save_state_dict({"blocks.0.attn.q.weight": torch.randn(64, 256)}, old,
                    metadata={"quantize.imatrix.file": "stale.dat",
                              "quantize.imatrix.dataset": "stale.txt"})
    imat = _write_gguf_imatrix(tmp_path / "im.gguf",
                               {"blocks.0.attn.q.weight": (np.ones((1, 256)), np.ones((1, 1)))},
                               datasets=(), chunks=0)
    convert(old, tmp_path / "new.gguf", qtype="Q4_K", imatrix=imat)
    with GGUFFile(tmp_path / "new.gguf") as g:
        assert g.metadata["quantize.imatrix.file"] == str(imat)
        assert "quantize.imatrix.dataset" not in g.metadata
        assert "quantize.imatrix.chunks_count" not in g.metadata


# -- files laid out exactly as llama.cpp's tools write them -------------------------------------


def _llama_cpp_gguf_imatrix(path, entries: dict[str, tuple[np.ndarray, np.ndarray]],
                            datasets=("calib.txt",), chunk_count=10, chunk_size=512):
    """An imatrix GGUF written with gguf-py the way llama.cpp's ``save_imatrix`` lays it out.

    The keys, in its order: ``general.type`` = "imatrix", ``imatrix.datasets`` (string array),
    ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32), and no ``general.architecture``.
    The tensors, entries in sorted name order, each ``.in_sum2`` (ggml ne ``[n_per_row, n_mat]``),
    ``.counts`` (ne ``[1, n_mat]``) and ``.in_sum`` (the plain sums, same shape as in_sum2), all
    F32. ggml writes only up to the last dim that is not 1, so one matrix is a 1-D ``in_sum2``
    and a 1-D ``counts`` of one element: the numpy shapes given to gguf-py follow that.
    """
    import gguf

    w = gguf.GGUFWriter(path, "unused")
    del w.kv_data[0]["general.architecture"]  # llama.cpp's imatrix file has none
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        sums, counts = entries[name]
        sums = np.asarray(sums, np.float32)
        counts = np.asarray(counts, np.float32).reshape(-1)
        n_mat = counts.size
        as_ggml = sums.reshape(-1) if n_mat == 1 else sums.reshape(n_mat, -1)
        w.add_tensor(name + ".in_sum2", as_ggml)
        w.add_tensor(name + ".counts", counts if n_mat == 1 else counts.reshape(n_mat, 1))
        w.add_tensor(name + ".in_sum", np.sqrt(as_ggml))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_quantize_values(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """What llama-quantize hands ggml for a GGUF entry: per matrix, sums / count in float32, or
    1 for a matrix whose count is 0."""
    c = np.asarray(counts, np.float32).reshape(-1)
    s = np.asarray(sums, np.float32).reshape(c.size, -1)
    out = np.ones_like(s)
    for j in range(c.size):
        if c[j] > 0:
            out[j] = s[j] / c[j]
    return out.reshape(-1)


def test_gguf_imatrix_as_llama_cpp_writes_it_gives_llama_quantizes_values(tmp_path):
    import gguf

    rng = _rng(11)
    entries = {
        "blk.0.attn_q.weight": (rng.uniform(0, 900, 256), np.array([1536.0])),
        "blk.0.ffn_up_exps.weight": (rng.uniform(0, 900, (4, 128)),
                                     np.array([700.0, 0.0, 3.0, 1536.0])),
        # a 3-D weight used by a plain MUL_MAT: one count for all its matrices, sums flat
        "blk.0.attn_k_b.weight": (rng.uniform(0, 900, 2 * 64), np.array([512.0])),
    }
    p = _llama_cpp_gguf_imatrix(tmp_path / "imatrix.gguf", entries,
                                datasets=("wiki.train.raw", "code.txt"), chunk_count=3)
    # gguf-py agrees with the layout: 1-D sums and counts for one matrix, [n_per_row, n_mat]
    # ggml dims for several.
    dims = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(p).tensors}
    assert dims["blk.0.attn_q.weight.in_sum2"] == [256]
    assert dims["blk.0.attn_q.weight.counts"] == [1]
    assert dims["blk.0.ffn_up_exps.weight.in_sum2"] == [128, 4]
    assert dims["blk.0.ffn_up_exps.weight.counts"] == [1, 4]

    m = load_imatrix(p)
    assert m.format == "gguf" and m.chunks == 3 and m.datasets == ("wiki.train.raw", "code.txt")
    assert set(m.entries) == set(entries)  # .in_sum tensors are not entries
    for name, (sums, counts) in entries.items():
        assert np.array_equal(m.entries[name].numpy(), _llama_quantize_values(sums, counts)), name
    assert m.weights_for("blk.0.attn_q.weight", (4096, 256)).shape == (1, 256)
    experts = m.weights_for("blk.0.ffn_up_exps.weight", (4, 512, 128))
    assert experts.shape == (4, 128) and torch.equal(experts[1], torch.ones(128))
    assert m.weights_for("blk.0.attn_k_b.weight", (2, 32, 64)).shape == (2, 64)
    meta = m.metadata()
    assert meta["quantize.imatrix.dataset"] == "wiki.train.raw"  # the first, as llama.cpp
    assert meta["quantize.imatrix.entries_count"] == TypedValue(GGUFValueType.UINT32, 3)
    assert meta["quantize.imatrix.chunks_count"] == TypedValue(GGUFValueType.UINT32, 3)


def test_legacy_imatrix_as_llama_cpp_writes_it_gives_the_means(tmp_path):
    # save_imatrix_legacy stores (sum / count) * ncall per value, ncall = ceil(max count /
    # chunk size), a zero-count expert as 1 * ncall; then the chunk count and the dataset.
    rng = _rng(12)
    sums = rng.uniform(0, 900, (2, 64)).astype(np.float32)
    counts = np.array([1500, 0])
    ncall = -(-int(counts.max()) // 512)
    stored = np.where(counts[:, None] > 0,
                      sums / np.maximum(counts, 1)[:, None].astype(np.float32),
                      np.float32(1)).astype(np.float32) * np.float32(ncall)
    p = _write_legacy(tmp_path / "imatrix.dat", {"blk.0.ffn_down_exps.weight":
                                                 (ncall, stored.reshape(-1))},
                      chunks=3, dataset="wiki.train.raw")
    m = load_imatrix(p)
    got = m.weights_for("blk.0.ffn_down_exps.weight", (2, 16, 64))
    assert torch.equal(got[1], torch.ones(64))
    assert np.array_equal(got.numpy().reshape(-1), stored.reshape(-1) / np.float32(ncall))
    assert m.chunks == 3 and m.datasets == ("wiki.train.raw",)


def test_legacy_trailer_with_only_the_chunk_count_reads(tmp_path):
    # stable-diffusion.cpp's imatrix writer ends the file with the chunk count alone.
    p = _write_legacy(tmp_path / "sd.dat", {"model.diffusion_model.blocks.0.q.weight":
                                            (4, np.full(32, 8.0))}, chunks=4)
    m = load_imatrix(p)
    assert m.chunks == 4 and m.datasets == ()
    assert torch.equal(m.entries["model.diffusion_model.blocks.0.q.weight"], torch.full((32,), 2.0))
    assert IMATRIX_METADATA_KEYS["dataset"] not in m.metadata()


def test_legacy_zero_length_dataset_name_records_no_dataset(tmp_path):
    # llama.cpp's imatrix tool writes a zero length when it had no prompt file; llama-quantize
    # then writes no quantize.imatrix.dataset (not an empty one).
    p = _write_legacy(tmp_path / "m.dat", {"a": (1, np.ones(32))}, chunks=2, dataset="")
    m = load_imatrix(p)
    assert m.datasets == () and m.chunks == 2
    assert IMATRIX_METADATA_KEYS["dataset"] not in m.metadata()
