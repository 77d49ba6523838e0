"""The GGUF writer: save_state_dict, byte-exact round trips, >4-D tensors, metadata, failures."""

from __future__ import annotations

import os

import ggml_gguf
import gguf
import numpy as np
import oracle as _oracle
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from ggufvideo import GGUFFile, load_state_dict
from ggufvideo.errors import GGUFError, QuantizationError
from ggufvideo.quants import dequantize, get_quant_type, quantize
from ggufvideo.tensor import GGMLTensor
from ggufvideo.writer import (
    GENERIC_ARCHITECTURE,
    RawValue,
    TensorEntry,
    TypedValue,
    detect_architecture,
    save_state_dict,
    stored_layout,
    write_gguf,
)

needs_ggml = pytest.mark.skipif(_oracle.load() is None, reason="ggml (pywhispercpp) not installed")


def can(q: str) -> bool:
    return get_quant_type(q).can_quantize


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.self_attn.q.weight": torch.randn(64, 512, generator=g),
        "blocks.0.self_attn.q.bias": torch.randn(64, generator=g).half(),
        "blocks.0.ffn.2.weight": torch.randn(128, 256, generator=g).bfloat16(),
        "patch_embedding.weight": torch.randn(256, 16, 1, 2, 2, generator=g),
        "blocks.0.modulation": torch.randn(1, 6, 256, generator=g),
        "blocks.0.self_attn.norm_q.weight": torch.randn(64, generator=g),
        "head.modulation": torch.randn(1, 2, 256, generator=g),
        "odd.weight": torch.randn(32, 96, generator=g),
        "positions": torch.arange(12, dtype=torch.int32).reshape(3, 4),
    }


# -- lossless saving --------------------------------------------------------------------------


def test_save_state_dict_without_qtype_is_lossless(tmp_path):
    sd = _sd()
    sd["empty"] = torch.zeros(0, 3)
    sd["scalar_like"] = torch.tensor([2.5])
    path = tmp_path / "m.gguf"
    save_state_dict(sd, path)
    out = load_state_dict(path)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q4_0"])
def test_quantized_tensors_are_the_quantizer_bytes(tmp_path, qtype):
    if not can(qtype):
        pytest.skip(f"{qtype} quantizer not available")
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    save_state_dict({"w.weight": w}, tmp_path / "q.gguf", qtype=qtype)
    with GGUFFile(tmp_path / "q.gguf") as g:
        info = g.tensors["w.weight"]
        assert info.qtype == T[qtype]
        assert torch.equal(g.tensor_data(info).clone(), quantize(w, qtype))


@needs_ggml
def test_q4_k_file_bytes_match_ggml_reference(tmp_path, oracle):
    if not can("Q4_K"):
        pytest.skip("Q4_K quantizer not available")
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(2))
    save_state_dict({"w.weight": w}, tmp_path / "q.gguf", qtype="Q4_K")
    with GGUFFile(tmp_path / "q.gguf") as g:
        ours = g.tensor_data("w.weight").numpy().reshape(-1).copy()
    ref = np.asarray(oracle.quantize(w.numpy(), T.Q4_K, None)).reshape(-1)
    assert np.array_equal(ours, ref)


def _raw_tensors(path) -> dict[str, tuple[T, bytes]]:
    with GGUFFile(path) as g:
        return {n: (i.qtype, g.tensor_data(i).numpy().tobytes()) for n, i in g.tensors.items()}


def test_lazy_load_then_save_reproduces_every_tensor_byte_for_byte(tmp_path):
    qtype = "Q4_K_M" if can("Q4_K") and can("Q5_K") else "Q8_0"
    first = tmp_path / "a.gguf"
    save_state_dict(_sd(), first, qtype=qtype)
    sd = load_state_dict(first, lazy=True)
    assert any(isinstance(v, GGMLTensor) for v in sd.values())
    # GGMLTensors are written as they are even when a (different) type is asked for
    second = tmp_path / "b.gguf"
    save_state_dict(sd, second, qtype="Q8_0")
    assert _raw_tensors(second) == _raw_tensors(first)
    assert load_state_dict(second)["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)


def test_load_model_state_dict_save_round_trip_is_byte_exact(tmp_path):
    from ggufvideo import empty_weights, load_model
    from ggufvideo.demo import TinyVideoDiT

    torch.manual_seed(0)
    model = TinyVideoDiT(dim=256, ffn=512, layers=1)
    first = tmp_path / "model.gguf"
    # K-quant bytes round-trip in the test above; Q8_0 keeps this one fast
    save_state_dict(model.state_dict(), first, qtype="Q8_0")
    with empty_weights():
        fresh = TinyVideoDiT(dim=256, ffn=512, layers=1)
    load_model(fresh, first, lazy=True)
    second = tmp_path / "again.gguf"
    save_state_dict(fresh.state_dict(), second)
    assert _raw_tensors(second) == _raw_tensors(first)


# -- readers other than ours ------------------------------------------------------------------


def test_gguf_py_reads_our_files(tmp_path):
    path = tmp_path / "m.gguf"
    sd = _sd()
    save_state_dict(sd, path, qtype="Q8_0", metadata={"my.key": "hello", "my.n": 7})
    r = gguf.GGUFReader(path)
    assert r.get_field("general.architecture").contents() == "wan"
    assert r.get_field("my.key").contents() == "hello"
    assert r.get_field("my.n").contents() == 7
    ours = load_state_dict(path)
    assert [t.name for t in r.tensors] == list(sd)
    for t in r.tensors:
        if t.tensor_type == T.I32:
            assert np.array_equal(t.data.reshape(-1), sd[t.name].numpy().reshape(-1))
            continue
        vals = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(np.asarray(vals, dtype=np.float64).reshape(-1),
                              ours[t.name].double().numpy().reshape(-1)), t.name


def _comfy_restore(path) -> dict[str, torch.Tensor]:
    """ComfyUI-GGUF's loader rule, reimplemented: the shape is ``comfy.gguf.orig_shape.<name>``
    (which must be an ARRAY of INT32) if present, else the stored dims reversed; the data is
    decoded flat and viewed in that shape."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        field = r.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if field is not None:
            if field.types != [GGUFValueType.ARRAY, GGUFValueType.INT32]:
                raise TypeError(f"bad orig_shape for {t.name}: {field.types}")
            shape = tuple(int(field.parts[i][0]) for i in field.data)
        else:
            shape = tuple(int(v) for v in reversed(t.shape))
        flat = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1)
        out[t.name] = torch.from_numpy(flat.astype(np.float32)).view(shape)
    return out


@pytest.mark.parametrize("qtype", [None, "Q8_0", "Q4_K"])
def test_five_dim_tensors_restore_in_our_loader_and_by_comfyui_rule(tmp_path, qtype):
    if qtype and not can(qtype):
        pytest.skip(f"{qtype} quantizer not available")
    g = torch.Generator().manual_seed(3)
    sd = {"vae.conv_in.weight": torch.randn(256, 16, 1, 2, 2, generator=g),
          "vae.conv.weight": torch.randn(32, 32, 3, 3, 3, generator=g),
          "six.weight": torch.randn(4, 4, 4, 4, 4, 8, generator=g)}
    path = tmp_path / "5d.gguf"
    save_state_dict(sd, path, qtype=qtype)
    with GGUFFile(path) as f:
        if qtype is None:  # native n-dim infos, no shape metadata
            assert [len(i.shape) for i in f.tensors.values()] == [5, 5, 6]
            assert not [k for k in f.metadata if "shape" in k]
        else:  # quantized: flattened rows + both shape conventions
            assert all(len(i.shape) <= 4 for i in f.tensors.values())
    ours = load_state_dict(path)
    comfy = _comfy_restore(path)
    for k, v in sd.items():
        assert ours[k].shape == v.shape and comfy[k].shape == v.shape, k
        assert torch.equal(ours[k].float(), comfy[k]), k
        if qtype is None:
            assert torch.equal(ours[k], v)


@needs_ggml
def test_ggml_c_loader_accepts_our_files(tmp_path):
    path = tmp_path / "m.gguf"
    sd = _sd()
    # ggml's C loader caps tensors at 4 dims: an unquantized 5-D tensor is written natively (what
    # the video loaders read), so only a file whose 5-D tensors are quantized suits it
    sd["vae.conv.weight"] = sd.pop("patch_embedding.weight")
    sd["empty"] = torch.zeros(4, 0)
    summary = save_state_dict(sd, path, qtype="Q8_0")
    seen = ggml_gguf.ggml_read(path)
    assert seen is not None, "ggml's gguf_init_from_file rejected the file"
    assert [n for n, _, _ in seen] == list(sd)
    assert [t for _, t, _ in seen] == [int(summary.decisions[n].qtype) for n in sd]
    with GGUFFile(path) as f:
        assert [f.tensors[n].offset - f.data_offset for n, _, _ in seen] == [o for _, _, o in seen]


# -- layout and metadata ----------------------------------------------------------------------


def test_stored_layout_rules():
    assert stored_layout((64, 512), T.Q4_K) == ((64, 512), False)
    assert stored_layout((5120, 16, 1, 2, 2), T.Q4_K) == ((1280, 256), True)
    # unquantized >4-D: native n-dim infos (diffusers, ComfyUI-GGUF, stable-diffusion.cpp read them)
    assert stored_layout((5120, 16, 1, 2, 2), T.F16) == ((5120, 16, 1, 2, 2), False)
    assert stored_layout((3, 3, 3, 3, 3), T.F32) == ((3, 3, 3, 3, 3), False)
    assert stored_layout((64, 64, 3, 3), T.Q8_0) == ((144, 256), True)  # already-quantized data
    assert stored_layout((), T.F32) == ((1,), False)
    assert stored_layout((5, 0, 2), T.F16) == ((0,), True)
    with pytest.raises(QuantizationError, match="whole number"):
        stored_layout((3, 3, 3, 3, 3), T.Q8_0)


def test_metadata_values_keep_their_types(tmp_path):
    meta = {
        "s": "text", "b": True, "i": -5, "big": 1 << 40, "u64": TypedValue(GGUFValueType.UINT64, 3),
        "f": 0.5, "np_f64": np.float64(0.1), "strs": ["a", "bc"], "ints": [1, 2, 3],
        "floats": [0.5, 1.5], "arr_u16": np.array([1, 2], dtype=np.uint16),
        "nested": [[1, 2], ["x"]], "raw": RawValue(GGUFValueType.UINT8, b"\x07"),
    }
    path = tmp_path / "meta.gguf"
    save_state_dict({"x": torch.zeros(2)}, path, metadata=meta)
    with GGUFFile(path) as g:
        m = g.metadata
        types = {k: g.fields[k].type for k in meta}
        assert m["s"] == "text" and m["b"] is True and m["i"] == -5 and m["big"] == 1 << 40
        assert types["i"] == GGUFValueType.INT32 and types["big"] == GGUFValueType.INT64
        assert types["u64"] == GGUFValueType.UINT64 and types["f"] == GGUFValueType.FLOAT32
        assert types["np_f64"] == GGUFValueType.FLOAT64 and m["np_f64"] == 0.1
        assert m["strs"] == ["a", "bc"] and list(m["ints"]) == [1, 2, 3]
        assert list(m["floats"]) == [0.5, 1.5] and m["arr_u16"].dtype == np.uint16
        assert [list(x) for x in m["nested"]] == [[1, 2], ["x"]]
        assert m["raw"] == 7 and types["raw"] == GGUFValueType.UINT8
    assert gguf.GGUFReader(path).get_field("s").contents() == "text"


def test_file_records_architecture_file_type_and_quantization_version(tmp_path):
    path = tmp_path / "m.gguf"
    save_state_dict(_sd(), path, qtype="Q8_0")
    with GGUFFile(path) as g:
        assert g.metadata["general.architecture"] == "wan"
        assert g.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
        assert g.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert g.version == 3 and g.alignment == 32
    save_state_dict(_sd(), path, metadata={"general.architecture": "custom"}, overwrite=True)
    with GGUFFile(path) as g:
        assert g.metadata["general.architecture"] == "custom"


@pytest.mark.parametrize("names,arch", [
    ({"head.modulation", "blocks.0.self_attn.norm_q.weight"}, "wan"),
    ({"condition_embedder.time_proj.weight", "blocks.0.attn1.norm_q.weight",
      "blocks.0.attn2.to_k.weight"}, "wan"),
    ({"model.diffusion_model.head.modulation",
      "model.diffusion_model.blocks.0.self_attn.norm_q.weight"}, "wan"),
    ({"double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_mod.linear.weight"}, "hyvid"),
    ({"img_in.proj.weight", "txt_in.input_embedder.weight"}, "hyvid"),
    ({"patchify_proj.weight", "adaln_single.linear.weight"}, "ltxv"),
    ({"double_blocks.0.img_attn.proj.weight"}, "flux"),
    ({"video_model.head.modulation", "video_model.blocks.0.self_attn.norm_q.weight",
      "audio_model.head.modulation", "audio_model.blocks.0.self_attn.norm_q.weight"},
     GENERIC_ARCHITECTURE),
    ({"encoder.conv_in.weight"}, GENERIC_ARCHITECTURE),
])
def test_architecture_detection(names, arch):
    assert detect_architecture(names) == arch


# -- errors -----------------------------------------------------------------------------------


def test_non_tensor_value_is_a_clear_error(tmp_path):
    with pytest.raises(GGUFError, match="tensor step: expected a tensor"):
        save_state_dict({"step": 3}, tmp_path / "x.gguf")
    assert not os.listdir(tmp_path)


def test_dtype_without_a_gguf_type_is_a_clear_error(tmp_path):
    with pytest.raises(GGUFError, match="uint8"):
        save_state_dict({"mask": torch.zeros(4, dtype=torch.uint8)}, tmp_path / "x.gguf")


def test_meta_tensor_is_a_clear_error(tmp_path):
    with pytest.raises(GGUFError, match="meta device"):
        save_state_dict({"w": torch.empty(4, 4, device="meta")}, tmp_path / "x.gguf")


def test_qtype_and_policy_together_are_refused(tmp_path):
    from ggufvideo.policy import QuantPolicy

    with pytest.raises(ValueError, match="either"):
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "x.gguf", qtype="Q8_0",
                        policy=QuantPolicy.from_type("Q8_0"))


def test_non_finite_values_refuse_quantization_and_leave_no_file(tmp_path):
    w = torch.randn(64, 256)
    w[3, 5] = float("nan")
    dst = tmp_path / "x.gguf"
    with pytest.raises(QuantizationError, match="tensor w.weight: 1 non-finite"):
        save_state_dict({"a.weight": torch.randn(64, 256), "w.weight": w}, dst, qtype="Q8_0")
    assert not os.listdir(tmp_path)


def test_failure_keeps_the_existing_destination_intact(tmp_path):
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"precious")
    w = torch.full((64, 256), float("inf"))
    with pytest.raises(QuantizationError):
        save_state_dict({"w.weight": w}, dst, qtype="Q8_0", overwrite=True)
    assert dst.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["x.gguf"]


def test_existing_file_is_not_replaced_without_overwrite(tmp_path):
    dst = tmp_path / "x.gguf"
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        save_state_dict({"w": torch.zeros(2)}, dst, overwrite=False)
    assert dst.read_bytes() == b"old"


def test_producer_with_wrong_byte_count_is_an_error_and_leaves_no_file(tmp_path):
    entry = TensorEntry("w", T.F32, (4,), lambda: [torch.zeros(3, dtype=torch.uint8)])
    with pytest.raises(GGUFError, match="needs 16 bytes, its producer gave 3"):
        write_gguf(tmp_path / "x.gguf", [entry])
    assert not os.listdir(tmp_path)


def test_duplicate_tensor_names_are_refused(tmp_path):
    e = TensorEntry("w", T.F32, (1,), lambda: [b"\0" * 4])
    with pytest.raises(GGUFError, match="duplicate tensor name"):
        write_gguf(tmp_path / "x.gguf", [e, e])


def test_metadata_that_cannot_be_encoded_is_a_clear_error(tmp_path):
    with pytest.raises(GGUFError, match="metadata 'obj'"):
        save_state_dict({"w": torch.zeros(2)}, tmp_path / "x.gguf", metadata={"obj": object()})
    with pytest.raises(GGUFError, match="written by the writer"):
        save_state_dict({"c": torch.zeros(2, 2, 2, 2, 256)}, tmp_path / "x.gguf", qtype="Q8_0",
                        metadata={"c.raw_shape": [2, 2, 2, 2, 256]})


def test_writing_over_a_protected_source_is_refused(tmp_path):
    src = tmp_path / "src.gguf"
    save_state_dict({"w": torch.zeros(2)}, src)
    before = src.read_bytes()
    with pytest.raises(GGUFError, match="source file"):
        write_gguf(src, [], overwrite=True, protect=[src])
    assert src.read_bytes() == before


def test_dequantized_values_of_a_written_tensor_match_direct_dequantize(tmp_path):
    w = torch.randn(32, 256)
    save_state_dict({"w.weight": w}, tmp_path / "q.gguf", qtype="Q8_0")
    expected = dequantize(quantize(w, "Q8_0"), "Q8_0")
    assert torch.equal(load_state_dict(tmp_path / "q.gguf")["w.weight"], expected)


def test_summary_warns_about_names_ggml_c_loader_rejects(tmp_path):
    name = "video_model.blocks.29.cross_attn.norm_k_img.extra_long_suffix.weight"
    s = save_state_dict({name: torch.zeros(4)}, tmp_path / "x.gguf")
    assert len(name) >= 64 and "C loader" in str(s)
    assert list(load_state_dict(tmp_path / "x.gguf")) == [name]  # kept verbatim all the same
