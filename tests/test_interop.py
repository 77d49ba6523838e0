"""Files we write load in the peers' loaders: diffusers' own single-file GGUF loader (offline, with
a local config folder) and ComfyUI-GGUF's shape rule; published-style files load in ours."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import GGUFQuantizationConfig, WanTransformer3DModel  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGUFFile  # noqa: E402
from ggufvideo.cli import main  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
              out_channels=16, text_dim=64, freq_dim=32, ffn_dim=512, num_layers=2,
              cross_attn_norm=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers model folder (config.json + safetensors), as save_pretrained writes it."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG).eval()
    path = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(path)
    return path, model


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=g),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g))


def run(model):
    with torch.no_grad():
        return model(**inputs(), return_dict=False)[0]


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_original_layout_file_loads_in_diffusers_from_single_file_offline(folder, tmp_path,
                                                                           monkeypatch,
                                                                           source_dtype):
    """Real releases are bf16: the tensors kept at high precision must be ones diffusers reads
    (it takes BF16 for a quantized type and hands raw bytes to a Conv3d, a norm, a bias)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, model = folder
    if source_dtype != torch.float32:
        import copy
        import shutil

        bf16 = tmp_path / "transformer_bf16"
        copy.deepcopy(model).to(source_dtype).save_pretrained(bf16)  # (the fixture's stays)

        shutil.copy(src / "config.json", bf16 / "config.json")
        src = bf16
    dst = tmp_path / "wan-Q8_0.gguf"
    assert main(["convert", str(src), str(dst), "--type", "Q8_0", "--layout", "original",
                 "-q"]) == 0
    theirs = WanTransformer3DModel.from_single_file(
        str(dst), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(src), local_files_only=True)
    ours = ggufvideo.from_gguf(dst)
    assert ours.config.num_layers == 2
    a, b, ref = run(theirs), run(ours), run(model)
    # both decode the same Q8_0 blocks; they differ only in the order of float32 arithmetic
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert (b - ref).abs().max() < (0.05 if source_dtype == torch.float32 else 0.1)


def test_layouts_round_trip_through_convert_bit_for_bit(folder, tmp_path):
    src, _ = folder
    orig = tmp_path / "o.gguf"
    back = tmp_path / "d.gguf"
    ggufvideo.convert(src, orig, qtype="Q8_0", layout="original")
    ggufvideo.convert(orig, back, qtype="Q8_0", layout="diffusers")
    direct = tmp_path / "direct.gguf"
    ggufvideo.convert(src, direct, qtype="Q8_0")
    a = ggufvideo.load_state_dict(back, lazy=True)
    b = ggufvideo.load_state_dict(direct, lazy=True)
    assert list(a) == list(b) or set(a) == set(b)
    for k, v in b.items():
        w = a[k]
        if isinstance(v, ggufvideo.GGMLTensor):
            assert torch.equal(w.raw, v.raw), k  # raw blocks copied, never requantized
        else:
            assert torch.equal(w, v), k
    assert torch.equal(run(ggufvideo.from_gguf(orig)), run(ggufvideo.from_gguf(direct)))


def test_patch_embedding_is_a_native_5d_f32_tensor_as_in_published_files(folder, tmp_path):
    src, _ = folder
    dst = tmp_path / "o.gguf"
    ggufvideo.convert(src, dst, qtype="Q4_K_M", layout="original")
    with GGUFFile(dst) as f:
        info = f.tensors["patch_embedding.weight"]
        assert info.qtype.name == "F32" and list(info.shape) == [256, 16, 1, 2, 2]
        assert not [k for k in f.metadata if "orig_shape" in k or k.endswith(".raw_shape")]
        assert f.metadata["general.architecture"] == "wan"
    # ComfyUI-GGUF's loader rule: the shape is the stored dims (no orig_shape key); gguf-py reads
    r = gguf.GGUFReader(dst)
    t = next(t for t in r.tensors if t.name == "patch_embedding.weight")
    assert tuple(int(d) for d in reversed(t.shape)) == (256, 16, 1, 2, 2)
    assert np.asarray(t.data).size == 256 * 16 * 4


def test_unknown_layout_and_unknown_family_are_clear_errors(folder, tmp_path):
    src, _ = folder
    with pytest.raises(ggufvideo.ModelLoadError, match="unknown layout .comfy.: Wan 2.1/2.2 transformer has the layouts diffusers, original"):
        ggufvideo.convert(src, tmp_path / "x.gguf", layout="comfy")
    plain = tmp_path / "plain.gguf"
    ggufvideo.save_state_dict({"foo.weight": torch.zeros(4, 4)}, plain)
    with pytest.raises(ggufvideo.ModelLoadError, match="no known model family"):
        ggufvideo.convert(plain, tmp_path / "y.gguf", layout="original")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


@pytest.mark.parametrize("module,variant,release", [
    ("test_models_wan_vae", "2.1", "original"), ("test_models_wan_vae", "2.2", "original-2.2"),
    ("test_models_ltx_vae", "0.9.0", "original-0.9.0"),
    ("test_models_ltx_vae", "0.9.1", "original-0.9.1"), ("test_models_ltx_vae", "0.9.5", "original")])
def test_layout_original_writes_the_names_of_the_models_own_release(module, variant, release,
                                                                     tmp_path):
    """VAEs whose releases changed their names: --layout original picks this model's release."""
    import importlib

    from safetensors.torch import save_file

    from ggufvideo.building import describe_file

    model = importlib.import_module(module).build(variant)
    src = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    dst = tmp_path / "vae.gguf"
    summary = ggufvideo.convert(src, dst, qtype=None, layout="original")
    assert f"in the {release} layout" in " ".join(summary.notes)
    assert describe_file(dst).detection.layout == release
    loaded = ggufvideo.from_gguf(dst, config={"norm_num_groups": 4} if "hunyuan" in module else None)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
