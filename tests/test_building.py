"""``from_gguf`` and ``load_model``'s layout mapping on real diffusers architectures."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGMLTensor, ModelLoadError, empty_weights, load_model  # noqa: E402
from ggufvideo.building import CONFIG_KEY, describe_file, from_gguf  # noqa: E402
from ggufvideo.errors import UnknownModelError  # noqa: E402
from ggufvideo.model import assign_state_dict  # noqa: E402
from ggufvideo.models import get_family  # noqa: E402
from ggufvideo.models.tensors import TensorOps  # noqa: E402

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
              out_channels=16, text_dim=64, freq_dim=32, ffn_dim=512, num_layers=2,
              cross_attn_norm=True, image_dim=64, added_kv_proj_dim=256)


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(**CONFIG).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 1, 4, 4, generator=g),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g),
                encoder_hidden_states_image=torch.randn(1, 4, 64, generator=g))


def save(model, path, layout, qtype="Q8_0", prefix=""):
    sd = get_family("wan").convert(model.state_dict(), "diffusers", layout, TensorOps())
    ggufvideo.save_state_dict({prefix + k: v for k, v in sd.items()}, path, qtype=qtype)
    return path


def run(model):
    with torch.no_grad():
        return model(**inputs(), return_dict=False)[0]


@pytest.mark.parametrize("layout,prefix", [("diffusers", ""), ("original", ""),
                                           ("original", "model.diffusion_model.")])
def test_from_gguf_builds_the_diffusers_model_without_a_config(wan, tmp_path, layout, prefix):
    path = save(wan, tmp_path / "w.gguf", layout, prefix=prefix)
    model = from_gguf(path)
    assert type(model) is WanTransformer3DModel
    assert model.config.num_layers == 2 and model.config.image_dim == 64
    assert isinstance(model.blocks[0].attn1.to_q.weight, GGMLTensor)
    reference = from_gguf(save(wan, tmp_path / "ref.gguf", "diffusers"))
    assert torch.equal(run(model), run(reference))  # bit-identical between layouts


def test_load_model_maps_the_original_layout_and_says_so(wan, tmp_path, caplog):
    path = save(wan, tmp_path / "o.gguf", "original", prefix="model.diffusion_model.")
    with empty_weights():
        model = WanTransformer3DModel(**CONFIG)
    with caplog.at_level(logging.INFO, logger="ggufvideo"):
        load_model(model, path)
    assert "original layout mapped to diffusers layout" in caplog.text
    ref = from_gguf(save(wan, tmp_path / "d.gguf", "diffusers"))
    assert torch.equal(run(model.eval()), run(ref))


def test_assign_state_dict_reports_the_mapping(wan):
    sd = get_family("wan").convert(wan.state_dict(), "diffusers", "original", TensorOps())
    with empty_weights():
        model = WanTransformer3DModel(**CONFIG)
    report = assign_state_dict(model, sd)
    assert report.layout is not None and report.layout.renamed
    assert (report.layout.source, report.layout.target) == ("original", "diffusers")
    assert not report.missing_keys and not report.unexpected_keys


def test_load_model_maps_diffusers_names_into_an_original_layout_module(wan, tmp_path):
    """A module named like the original release (e.g. ComfyUI's) takes a diffusers-named file."""
    sd = get_family("wan").convert(wan.state_dict(), "diffusers", "original", TensorOps())

    # a plain module tree with the original names
    root = torch.nn.Module()
    for k, v in sd.items():
        mod = root
        *parents, leaf = k.split(".")
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(v)))
    path = save(wan, tmp_path / "d.gguf", "diffusers", qtype=None)
    load_model(root, path)
    for k, v in sd.items():
        assert torch.equal(root.get_parameter(k).detach(), v), k


def test_non_strict_refuses_a_file_of_another_model_naming_both(wan, tmp_path):
    path = save(wan, tmp_path / "w.gguf", "original")
    with empty_weights():
        vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                               attn_scales=[], temperal_downsample=[False])
    with pytest.raises(ModelLoadError, match=r"Wan 2.1/2.2 transformer, original layout.*"
                                             r"AutoencoderKLWan"):
        load_model(vae, path, strict=False)
    assert all(p.device.type == "meta" for p in vae.parameters())  # nothing half-loaded


def test_unknown_architecture_lists_the_known_families(tmp_path):
    path = tmp_path / "x.gguf"
    ggufvideo.save_state_dict({"foo.weight": torch.zeros(4, 4)}, path,
                              metadata={"general.architecture": "llamafoo"})
    with pytest.raises(UnknownModelError, match="llamafoo.*known families: .*wan"):
        from_gguf(path)


def test_missing_tensor_is_named(wan, tmp_path):
    sd = get_family("wan").convert(wan.state_dict(), "diffusers", "original", TensorOps())
    del sd["text_embedding.0.weight"]
    path = tmp_path / "m.gguf"
    ggufvideo.save_state_dict(sd, path)
    with pytest.raises(ModelLoadError, match="text_embedding.0.weight|text_embedder.linear_1"):
        from_gguf(path)
    sd2 = get_family("wan").convert(wan.state_dict(), "diffusers", "original", TensorOps())
    del sd2["blocks.1.cross_attn.k_img.weight"]
    ggufvideo.save_state_dict(sd2, tmp_path / "m2.gguf")
    with pytest.raises(ModelLoadError, match="blocks.1.attn2.add_k_proj.weight"):
        from_gguf(tmp_path / "m2.gguf")


def test_stored_config_wins_over_inference(tmp_path):
    torch.manual_seed(0)
    cfg = {**CONFIG, "num_attention_heads": 4, "attention_head_dim": 64}
    model = WanTransformer3DModel(**cfg).eval()
    path = tmp_path / "c.gguf"
    ggufvideo.save_state_dict(model.state_dict(), path,
                              metadata={CONFIG_KEY: json.dumps(dict(model.config))})
    assert describe_file(path).config["num_attention_heads"] == 4
    loaded = from_gguf(path)
    assert torch.equal(run(loaded), run(model))


def test_bad_stored_config_is_named(wan, tmp_path):
    path = tmp_path / "c.gguf"
    ggufvideo.save_state_dict(wan.state_dict(), path, metadata={CONFIG_KEY: "{not json"})
    with pytest.raises(ModelLoadError, match="ggufvideo.config"):
        describe_file(path)


def test_inspect_shows_family_variant_layout_and_config(wan, tmp_path, capsys):
    from ggufvideo.cli import main

    path = save(wan, tmp_path / "w.gguf", "original", prefix="model.diffusion_model.")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model: Wan 2.1/2.2 transformer (wan), I2V" in out
    assert "layout: original (prefix 'model.diffusion_model.')" in out
    assert "num_layers = 2" in out and "image_dim = 64" in out
    assert main(["inspect", "--json", str(path)]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["family"] == "wan" and model["layout"] == "original"
    assert model["config"]["added_kv_proj_dim"] == 256


def test_inspect_of_an_unknown_model_says_why(tmp_path, capsys):
    from ggufvideo.cli import main

    path = tmp_path / "x.gguf"
    ggufvideo.save_state_dict({"foo.weight": torch.zeros(4, 4)}, path)
    assert main(["inspect", "--json", str(path)]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["family"] is None and "known families" in model["error"]


def test_missing_library_names_the_extra_to_install(wan, tmp_path, monkeypatch):
    import importlib

    from ggufvideo import building

    path = save(wan, tmp_path / "w.gguf", "original")
    real = importlib.import_module

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers":
            raise ImportError("no diffusers here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(building.importlib, "import_module", no_diffusers)
    with pytest.raises(ImportError, match=r"WanTransformer3DModel.*needs diffusers.*ggufvideo\[demo\]"):
        from_gguf(path)


def test_a_single_file_safetensors_checkpoint_builds_too(tmp_path):
    """ComfyUI setups hold VAEs (wan_2.1_vae.safetensors) and text encoders as safetensors."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16).eval()
    original = get_family("wan-vae").convert(vae.state_dict(), "diffusers", "original",
                                             TensorOps())
    assert set(convert_wan_vae_to_diffusers(dict(original))) == set(vae.state_dict())
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, path)
    assert describe_file(path).class_name == "AutoencoderKLWan"
    loaded = from_gguf(path)
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_other_kinds_of_file_are_refused_by_name(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(ModelLoadError, match=r"model.onnx.*expected a .gguf file, a single "
                                             r".safetensors \(or .pt/.pth\) checkpoint"):
        from_gguf(path)
    pt = tmp_path / "model.pt"  # a torch pickle is read (weights_only), then judged by its names
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(ModelLoadError, match=r"model.pt.*no known model family"):
        from_gguf(pt)
