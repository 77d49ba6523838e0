"""convert(): every source kind, the twin-backbone (Ovi-like) model, safety.

Streaming memory is tested per source kind in test_convert_memory.py.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType
from torch import nn

from ggufvideo import GGUFFile, empty_weights, load_model, load_state_dict
from ggufvideo.convert import SOURCE_METADATA_PREFIX, convert
from ggufvideo.demo import TinyVideoDiT
from ggufvideo.errors import GGUFError, QuantizationError
from ggufvideo.quants import get_quant_type
from ggufvideo.writer import GENERIC_ARCHITECTURE, TypedValue, save_state_dict

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file = safetensors_torch.save_file


def _sha(path) -> str:
    h = hashlib.sha256()
    for root, _, files in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _wan_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in TinyVideoDiT(dim=256, ffn=512, layers=1).state_dict().items()}


def _raw(path) -> dict[str, tuple[T, bytes]]:
    with GGUFFile(path) as g:
        return {n: (i.qtype, g.tensor_data(i).numpy().tobytes()) for n, i in g.tensors.items()}


# -- safetensors -------------------------------------------------------------------------------


def test_safetensors_converts_with_keys_verbatim_and_metadata(tmp_path):
    sd = _wan_sd()
    sd = {k: (v.bfloat16() if v.dim() == 2 else v) for k, v in sd.items()}
    src = tmp_path / "wan.safetensors"
    save_file(sd, src, metadata={"format": "pt", "modelspec.title": "tiny wan"})
    s = convert(src, tmp_path / "wan.gguf", qtype="Q8_0")
    assert s.architecture == "wan" and set(s.decisions) == set(sd)
    with GGUFFile(tmp_path / "wan.gguf") as g:
        assert set(g.tensors) == set(sd)
        assert g.metadata[SOURCE_METADATA_PREFIX + "modelspec.title"] == "tiny wan"
        assert g.metadata["general.name"] == "wan"
    out = load_state_dict(tmp_path / "wan.gguf")
    for k, v in sd.items():
        assert out[k].shape == v.shape
        d = s.decisions[k]
        if d.keep:
            assert torch.equal(out[k].to(v.dtype), v), k
        else:
            err = (out[k] - v.float()).norm() / v.float().norm()
            assert err < 0.01, (k, err)
    # counts in the summary add up and the text says what happened
    assert sum(s.counts().values()) == len(sd)
    assert "Q8_0" in str(s) and "->" in str(s)


def test_float8_and_float64_sources_convert(tmp_path):
    src = tmp_path / "f8.safetensors"
    w8 = torch.randn(64, 64).to(torch.float8_e4m3fn)
    save_file({"a.bias": w8[0].clone(), "b": torch.randn(8, dtype=torch.float64),
               "c.weight": w8}, src)
    convert(src, tmp_path / "f8.gguf", qtype="Q8_0")
    with GGUFFile(tmp_path / "f8.gguf") as g:
        assert g.tensors["a.bias"].qtype == T.F16 and g.tensors["b"].qtype == T.F32
    out = load_state_dict(tmp_path / "f8.gguf")
    assert torch.equal(out["a.bias"].float(), w8[0].float())  # float8 -> F16 is exact


# -- twin backbone (Ovi-like) ------------------------------------------------------------------


class _AudioBackbone(nn.Module):
    """A Wan-style 1-D (audio) stream: Conv1d patch embedding, attention, FFN, modulation."""

    def __init__(self, dim: int = 128, ffn: int = 256) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv1d(8, dim, kernel_size=4, stride=4)
        self.text_embedding = nn.Sequential(nn.Linear(256, dim), nn.GELU(), nn.Linear(dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim))
        self.self_attn = nn.ModuleDict({n: nn.Linear(dim, dim) for n in ("q", "k", "v", "o")})
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.head = nn.Linear(dim, 32)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(x).transpose(1, 2)
        h = h + self.modulation[:, 0] + self.text_embedding(ctx).mean(1, keepdim=True)
        a = self.self_attn
        att = torch.softmax(a["q"](h) @ a["k"](h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)
        h = h + a["o"](att @ a["v"](h))
        return self.head(h + self.ffn(h))


class _TwinBackbone(nn.Module):
    """Ovi's shape: a video stream and an audio stream in one checkpoint, plus fusion layers."""

    def __init__(self) -> None:
        super().__init__()
        self.video_model = TinyVideoDiT(dim=256, ffn=512, layers=1)
        self.audio_model = _AudioBackbone()
        self.fusion = nn.ModuleDict({"audio_to_video": nn.Linear(128, 256),
                                     "video_to_audio": nn.Linear(256, 128)})


def test_twin_backbone_model_converts_and_runs(tmp_path):
    torch.manual_seed(0)
    model = _TwinBackbone().eval()
    sd = model.state_dict()
    src = tmp_path / "ovi.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, src)
    s = convert(src, tmp_path / "ovi.gguf", qtype="Q8_0")
    assert s.architecture == GENERIC_ARCHITECTURE  # neither stream alone is "the" model
    assert set(s.decisions) == set(sd)
    dec = {k: d.qtype for k, d in s.decisions.items()}
    # both streams' sensitive layers stay high precision without per-architecture code
    for stream in ("video_model", "audio_model"):
        assert dec[f"{stream}.modulation" if stream == "audio_model" else
                   f"{stream}.blocks.0.modulation"] == T.F32
        assert dec[f"{stream}.text_embedding.0.weight"] == T.F32
    assert dec["video_model.patch_embedding.weight"] == T.F32  # kept, as published files do
    assert dec["video_model.blocks.0.ffn.0.weight"] == T.Q8_0
    assert dec["audio_model.ffn.0.weight"] == T.Q8_0
    assert dec["fusion.audio_to_video.weight"] == T.Q8_0
    assert dec["audio_model.patch_embedding.weight"] == T.F32  # rows of 4: no block fits

    with empty_weights():
        loaded = _TwinBackbone()
    load_model(loaded, tmp_path / "ovi.gguf", lazy=True)
    loaded.eval()
    g = torch.Generator().manual_seed(1)
    v_in = {"hidden_states": torch.randn(1, 16, 2, 8, 8, generator=g),
            "timestep": torch.tensor([10]),
            "encoder_hidden_states": torch.randn(1, 4, 256, generator=g)}
    a_in = (torch.randn(1, 8, 64, generator=g), torch.randn(1, 4, 256, generator=g))
    with torch.inference_mode():
        for ref, got in ((model.video_model(**v_in), loaded.video_model(**v_in)),
                         (model.audio_model(*a_in), loaded.audio_model(*a_in))):
            assert ((got - ref).norm() / ref.norm()) < 0.02


# -- sharded folders ---------------------------------------------------------------------------


def _shard(sd: dict[str, torch.Tensor], folder, index: bool = True) -> None:
    os.makedirs(folder, exist_ok=True)
    keys = list(sd)
    parts = {"model-00001-of-00002.safetensors": keys[::2],
             "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in parts.items():
        save_file({k: sd[k] for k in ks}, os.path.join(folder, fname))
    if index:
        wm = {k: f for f, ks in parts.items() for k in ks}
        index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
        with open(index, "w") as fh:
            json.dump({"metadata": {"total_size": 1}, "weight_map": dict(sorted(wm.items()))}, fh)


def test_sharded_folder_gives_the_same_tensors_as_one_file(tmp_path):
    sd = _wan_sd()
    save_file(sd, tmp_path / "one.safetensors")
    _shard(sd, tmp_path / "sharded")
    convert(tmp_path / "one.safetensors", tmp_path / "one.gguf", qtype="Q8_0")
    convert(tmp_path / "sharded", tmp_path / "sharded.gguf", qtype="Q8_0")
    one, sharded = _raw(tmp_path / "one.gguf"), _raw(tmp_path / "sharded.gguf")
    assert one == sharded
    assert list(sharded) == sorted(sd)  # the index's order


def test_missing_shard_is_a_clear_error(tmp_path):
    _shard(_wan_sd(), tmp_path / "s")
    os.remove(tmp_path / "s" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        convert(tmp_path / "s", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_malformed_index_is_a_clear_error(tmp_path):
    _shard(_wan_sd(), tmp_path / "s")
    (tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json").write_text("{nope")
    with pytest.raises(GGUFError, match="not a safetensors index"):
        convert(tmp_path / "s", tmp_path / "x.gguf")


def test_index_naming_a_tensor_its_shard_lacks_is_a_clear_error(tmp_path):
    _shard(_wan_sd(), tmp_path / "s")
    p = tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json"
    idx = json.loads(p.read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    p.write_text(json.dumps(idx))
    with pytest.raises(GGUFError, match="ghost.weight"):
        convert(tmp_path / "s", tmp_path / "x.gguf")


def test_duplicate_tensor_across_unindexed_shards_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "s")
    save_file({"w": torch.zeros(2)}, tmp_path / "s" / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "s" / "b.safetensors")
    with pytest.raises(GGUFError, match="tensor w: tensor also in"):
        convert(tmp_path / "s", tmp_path / "x.gguf")


# -- .pt / .pth --------------------------------------------------------------------------------


def test_pt_state_dict_converts_like_safetensors(tmp_path):
    sd = _wan_sd()
    save_file(sd, tmp_path / "m.safetensors")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "m.pt")
    convert(tmp_path / "m.safetensors", tmp_path / "a.gguf", qtype="Q8_0")
    s = convert(tmp_path / "m.pt", tmp_path / "b.gguf", qtype="Q8_0")
    assert _raw(tmp_path / "a.gguf") == {k: _raw(tmp_path / "b.gguf")[k] for k in sd}
    assert any("'state_dict'" in n for n in s.notes)


def test_pt_non_tensor_entries_are_skipped_and_reported(tmp_path):
    torch.save({"w.weight": torch.randn(4, 4), "step": 7, "name": "x"}, tmp_path / "m.pth")
    s = convert(tmp_path / "m.pth", tmp_path / "m.gguf", qtype="Q8_0")
    assert set(s.decisions) == {"w.weight"}
    assert any("skipped 2 non-tensor entries" in n for n in s.notes)
    assert "skipped 2" in str(s)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_pt_with_arbitrary_objects_is_refused_unexecuted(tmp_path, capfd):
    torch.save({"w": torch.zeros(2), "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(GGUFError, match="refusing to load"):
        convert(tmp_path / "evil.pt", tmp_path / "x.gguf")
    assert "should-never-run" not in capfd.readouterr().out


def test_legacy_pt_format_loads_without_mmap_and_says_so(tmp_path):
    torch.save({"w.weight": torch.randn(4, 4)}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False)
    s = convert(tmp_path / "old.pt", tmp_path / "old.gguf", qtype="Q8_0")
    assert any("legacy" in n for n in s.notes)


# -- GGUF (requantize) -------------------------------------------------------------------------


def _gguf_source(tmp_path):
    sd = _wan_sd()
    path = tmp_path / "src.gguf"
    save_state_dict(sd, path, qtype="Q8_0",
                    metadata={"custom.u16": TypedValue(GGUFValueType.UINT16, 7),
                              "custom.list": ["a", "b"], "general.architecture": "wan"})
    return sd, path


def test_gguf_requantizes_and_keeps_metadata_types(tmp_path):
    sd, src = _gguf_source(tmp_path)
    target = "Q4_0" if get_quant_type("Q4_0").can_quantize else "Q8_0"
    s = convert(src, tmp_path / "re.gguf", qtype=target,
                overrides={r"blocks\.0\.ffn\.2\.weight$": "Q8_0"})
    before, after = _raw(src), _raw(tmp_path / "re.gguf")
    # a tensor whose decided type is its stored type is copied, not requantized
    assert after["blocks.0.ffn.2.weight"] == before["blocks.0.ffn.2.weight"]
    assert after["blocks.0.self_attn.q.weight"][0] == T[target]
    for k, d in s.decisions.items():
        if d.keep:
            assert after[k] == before[k], k
    with GGUFFile(tmp_path / "re.gguf") as g:
        assert g.fields["custom.u16"].type == GGUFValueType.UINT16 and g.metadata["custom.u16"] == 7
        assert g.metadata["custom.list"] == ["a", "b"]
        assert g.metadata["general.architecture"] == "wan"
        assert g.metadata["general.file_type"] != 7 or target == "Q8_0"
    out = load_state_dict(tmp_path / "re.gguf")
    assert out["patch_embedding.weight"].shape == sd["patch_embedding.weight"].shape


def test_gguf_to_gguf_keep_is_an_exact_copy_of_every_tensor(tmp_path):
    _, src = _gguf_source(tmp_path)
    convert(src, tmp_path / "copy.gguf", qtype=None)
    assert _raw(tmp_path / "copy.gguf") == _raw(src)


# -- safety ------------------------------------------------------------------------------------


def test_refuses_to_overwrite_without_force(tmp_path):
    save_file(_wan_sd(), tmp_path / "m.safetensors")
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert(tmp_path / "m.safetensors", dst, qtype="Q8_0")
    assert dst.read_bytes() == b"keep me"
    convert(tmp_path / "m.safetensors", dst, qtype="Q8_0", force=True)
    assert dst.read_bytes()[:4] == b"GGUF"


def test_destination_equal_to_source_is_refused_even_with_force(tmp_path):
    _, src = _gguf_source(tmp_path)
    digest = _sha(src)
    with pytest.raises(GGUFError, match="source file"):
        convert(src, src, qtype="Q8_0", force=True)
    assert _sha(src) == digest


@pytest.mark.parametrize("kind", ["safetensors", "sharded", "pt", "gguf"])
def test_source_is_never_modified(tmp_path, kind):
    sd = _wan_sd()
    if kind == "safetensors":
        src = tmp_path / "m.safetensors"
        save_file(sd, src)
    elif kind == "sharded":
        src = tmp_path / "m"
        _shard(sd, src)
    elif kind == "pt":
        src = tmp_path / "m.pt"
        torch.save(sd, src)
    else:
        _, src = _gguf_source(tmp_path)
    digest, mtime = _sha(src), os.stat(src).st_mtime_ns
    convert(src, tmp_path / "out.gguf", qtype="Q8_0")
    assert _sha(src) == digest and os.stat(src).st_mtime_ns == mtime


def test_failure_midway_leaves_no_partial_destination(tmp_path, monkeypatch):
    import ggufvideo.writer as writer

    save_file(_wan_sd(), tmp_path / "m.safetensors")
    calls = []
    real = writer._quantize_rows

    def flaky(x, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise QuantizationError("simulated failure")
        return real(x, qtype)

    monkeypatch.setattr(writer, "_quantize_rows", flaky)
    with pytest.raises(QuantizationError, match="simulated"):
        convert(tmp_path / "m.safetensors", tmp_path / "out.gguf", qtype="Q8_0")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_missing_source_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "nope.safetensors", tmp_path / "x.gguf")


def test_unknown_source_format_is_a_clear_error(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(GGUFError, match="unknown source format"):
        convert(tmp_path / "m.onnx", tmp_path / "x.gguf")


def test_corrupt_safetensors_header_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(GGUFError, match="header length"):
        convert(tmp_path / "bad.safetensors", tmp_path / "x.gguf")
    (tmp_path / "bad.safetensors").write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(GGUFError, match="not JSON"):
        convert(tmp_path / "bad.safetensors", tmp_path / "x.gguf")


def test_truncated_safetensors_data_is_a_clear_error(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(GGUFError, match="tensor w: data_offsets"):
        convert(tmp_path / "t.safetensors", tmp_path / "x.gguf")


def test_bool_tensor_is_a_clear_error(tmp_path):
    save_file({"mask": torch.ones(4, dtype=torch.bool)}, tmp_path / "b.safetensors")
    with pytest.raises(GGUFError, match="tensor mask: dtype BOOL has no GGUF type"):
        convert(tmp_path / "b.safetensors", tmp_path / "x.gguf")


def test_empty_source_is_a_clear_error(tmp_path):
    save_file({}, tmp_path / "e.safetensors")
    with pytest.raises(GGUFError, match="no tensors"):
        convert(tmp_path / "e.safetensors", tmp_path / "x.gguf")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "Q6_K"])
def test_quantizing_on_cuda_writes_the_same_bytes_as_on_cpu(tmp_path, qtype):
    g = torch.Generator().manual_seed(1)
    sd = {"a.weight": torch.randn(256, 1024, generator=g),
          "c": torch.randn(64, 16, 1, 2, 2, generator=g),
          "b.weight": torch.randn(64, 96, generator=g), "b.bias": torch.randn(64, generator=g)}
    save_state_dict(sd, tmp_path / "cpu.gguf", qtype=qtype)
    save_state_dict(sd, tmp_path / "cuda.gguf", qtype=qtype, device="cuda")
    assert (tmp_path / "cpu.gguf").read_bytes() == (tmp_path / "cuda.gguf").read_bytes()


def test_a_releases_own_config_is_not_recorded(tmp_path):
    """Wan-AI's folder holds a config.json of its own "WanModel" (qk_norm true, dim...): not a
    diffusers config, so not recorded as ggufvideo.config for from_gguf."""
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in _wan_sd().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 256,
                                                    "qk_norm": True}))
    convert(folder / "model.safetensors", tmp_path / "wan.gguf", qtype="Q8_0")
    with GGUFFile(tmp_path / "wan.gguf") as g:
        assert "ggufvideo.config" not in g.metadata


def test_a_folder_with_weight_variants_reads_one(tmp_path):
    """diffusers saves variants beside the main weights (model.fp16.safetensors): the main files
    are read and the variants noted; several variants and no main file are an error."""
    folder = tmp_path / "transformer"
    folder.mkdir()
    sd = {k: v.contiguous() for k, v in _wan_sd().items()}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    save_file({k: v.half() for k, v in sd.items()}, folder / "diffusion_pytorch_model.fp16"
              ".safetensors")
    s = convert(folder, tmp_path / "out.gguf", qtype="Q8_0")
    assert any("variant file(s) fp16" in n for n in s.notes)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.bfloat16() for k, v in sd.items()}, folder / "diffusion_pytorch_model.bf16"
              ".safetensors")
    with pytest.raises(GGUFError, match="weight variants bf16, fp16 and no main files"):
        convert(folder, tmp_path / "out2.gguf", qtype="Q8_0")


def test_the_config_json_read_beside_the_source_is_never_written_over(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in _wan_sd().items()}, folder / "m.safetensors")
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    before = (folder / "config.json").read_bytes()
    with pytest.raises(GGUFError, match="refusing to write over the source file"):
        convert(folder, folder / "config.json", qtype="Q8_0", force=True)
    assert (folder / "config.json").read_bytes() == before
