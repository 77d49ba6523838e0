"""peft/diffusers LoRA scales kept outside the tensors: the safetensors header's
``lora_adapter_metadata`` and peft's ``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``,
rsLoRA). The reference is peft itself (and diffusers' loader) running the same adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lora_helpers import CONFIG, run_wan
from torch import nn

from ggufvideo import apply_lora
from ggufvideo.errors import LoraError
from ggufvideo.lora import read_lora
from ggufvideo.lora.config import AdapterConfig, configs_from_metadata

peft = pytest.importorskip("peft")
st = pytest.importorskip("safetensors.torch")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_folder_applies_with_its_adapter_config(tmp_path, rslora):
    """``save_pretrained``'s folder (``adapter_model.safetensors`` + ``adapter_config.json``,
    ``lora_alpha`` 16 at rank 4, ``fc2`` at alpha 2 by pattern): peft's own output."""
    torch.manual_seed(0)
    base = _Net().eval()
    plain = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, alpha_pattern={"fc2": 2}, use_rslora=rslora,
                          target_modules=["fc1", "fc2"])
    wrapped = peft.get_peft_model(base, cfg)
    _randomize(wrapped)
    wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    x = torch.randn(3, 32)
    for where in (tmp_path, tmp_path / "adapter_model.safetensors"):
        h = apply_lora(plain, where)
        with torch.no_grad():
            assert torch.allclose(plain(x), wrapped(x), rtol=1e-5, atol=1e-6)
        h.remove()
    lf = read_lora(tmp_path)
    scales = {e.target.rpartition(".")[2]: e.scale for e in lf}
    root = 2.0 if rslora else 4.0
    assert scales == {"fc1": 16 / root, "fc2": 2 / root}


def test_a_diffusers_saved_lora_applies_with_the_alpha_in_its_header(tmp_path):
    """diffusers' ``save_lora_adapter`` (the config in the header's ``lora_adapter_metadata``;
    ``lora_alpha`` 8 at rank 4): diffusers' own model with the adapter loaded."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**CONFIG).eval()
    plain = copy.deepcopy(model)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"]))
    _randomize(model)
    model.save_lora_adapter(tmp_path)
    (saved,) = tmp_path.glob("*.safetensors")
    from safetensors import safe_open

    with safe_open(saved, "pt") as f:
        assert "lora_adapter_metadata" in (f.metadata() or {})
    h = apply_lora(plain, saved)
    assert all(e.scale == 2.0 for e in read_lora(saved))
    assert torch.allclose(run_wan(plain), run_wan(model), rtol=1e-4, atol=1e-5)
    h.remove()


def test_an_explicit_alpha_wins_and_prefixed_metadata_picks_by_component(tmp_path):
    """A pipeline's header (``transformer.lora_alpha``...) scales the ``transformer.`` pairs only;
    a pair with its own ``.alpha`` keeps alpha / rank."""
    meta = {"transformer.r": 4, "transformer.lora_alpha": 2, "text_encoder.r": 4,
            "text_encoder.lora_alpha": 12}
    sd = {"transformer.a.lora_A.weight": torch.ones(4, 8), "transformer.a.lora_B.weight":
          torch.ones(8, 4), "text_encoder.b.lora_A.weight": torch.ones(4, 8),
          "text_encoder.b.lora_B.weight": torch.ones(8, 4), "transformer.c.lora_A.weight":
          torch.ones(4, 8), "transformer.c.lora_B.weight": torch.ones(8, 4),
          "transformer.c.alpha": torch.tensor(1.0)}
    path = tmp_path / "lora.safetensors"
    st.save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    scales = {e.target: e.scale for e in read_lora(path)}
    assert scales == {"transformer.a": 0.5, "text_encoder.b": 3.0, "transformer.c": 0.25}


def test_alpha_patterns_match_as_peft_matches_them():
    c = AdapterConfig(8.0, {"blocks.0.attn1.to_q": 2.0, r"blocks\.1\..*": 4.0})
    assert c.alpha_for("transformer.blocks.0.attn1.to_q") == 2.0
    assert c.alpha_for("blocks.0.attn1.to_q") == 2.0
    assert c.alpha_for("transformer.blocks.10.attn1.to_q") == 8.0  # no partial name matches
    assert c.alpha_for("transformer.blocks.1.ffn.net.2") == 4.0


def test_a_header_config_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    st.save_file({"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.ones(8, 4)}, path,
                 metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoraError, match="lora_adapter_metadata .* not JSON") as info:
        read_lora(path)
    assert "bad.safetensors" in str(info.value)
    with pytest.raises(LoraError, match="not readable"):
        configs_from_metadata(json.dumps({"lora_alpha": "many"}), "x.safetensors")


def test_a_peft_config_of_another_adapter_type_is_an_error(tmp_path):
    st.save_file({"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.ones(8, 4)},
                 tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoraError, match="IA3 adapter, not a LoRA") as info:
        read_lora(tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_a_folder_without_weights_names_what_it_looked_for(tmp_path):
    with pytest.raises(LoraError, match="adapter_model.safetensors, pytorch_lora_weights"):
        read_lora(tmp_path)


def test_a_config_beside_a_file_of_another_name_is_not_used(tmp_path):
    """Only peft's own ``adapter_model.*`` takes the ``adapter_config.json`` beside it: a folder
    of LoRAs may hold a config that is not theirs."""
    st.save_file({"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.ones(8, 4)},
                 tmp_path / "style.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    assert next(iter(read_lora(tmp_path / "style.safetensors"))).scale == 1.0


def test_anchored_patterns_and_renamed_keys_scale_as_diffusers_does(tmp_path):
    """diffusers writes anchored patterns (``^blocks.0.attn1.to_v``) for a mixed-rank file;
    they match the name inside the component. A file renamed to the original or kohya names after
    diffusers saved it keeps the ``transformer`` config (diffusers' Wan loader reads it so)."""
    meta = {"transformer.r": 4, "transformer.lora_alpha": 4,
            "transformer.alpha_pattern": {"^blocks.0.attn1.to_v": 16}}
    sd = {}
    for name, r in (("blocks.0.attn1.to_q", 4), ("blocks.0.attn1.to_v", 16)):
        sd[f"transformer.{name}.lora_A.weight"] = torch.ones(r, 8)
        sd[f"transformer.{name}.lora_B.weight"] = torch.ones(8, r)
    path = tmp_path / "mixed.safetensors"
    st.save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    assert {e.target: e.scale for e in read_lora(path)} == {
        "transformer.blocks.0.attn1.to_q": 1.0, "transformer.blocks.0.attn1.to_v": 1.0}
    renamed = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(8, 8),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(8, 8)}
    path = tmp_path / "renamed.safetensors"
    st.save_file(renamed, path, metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 8, "transformer.lora_alpha": 16})})
    assert next(iter(read_lora(path))).scale == 2.0


def test_a_header_without_scales_keeps_the_folders_config(tmp_path):
    st.save_file({"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.ones(8, 4)},
                 tmp_path / "adapter_model.safetensors",
                 metadata={"lora_adapter_metadata": json.dumps({"task_type": None})})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 12}))
    assert next(iter(read_lora(tmp_path))).scale == 3.0


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # peft's own check misreads the 1-D bias
def test_peft_lora_bias_applies_scaled_like_peft(tmp_path):
    """peft's ``lora_bias=True`` (a bias on ``lora_B``, scaled with the pair): peft's output."""
    torch.manual_seed(0)
    base = _Net().eval()
    plain = copy.deepcopy(base)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_bias=True,
                                                        target_modules=["fc1", "fc2"]))
    _randomize(wrapped)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.3)
    wrapped.save_pretrained(tmp_path)
    h = apply_lora(plain, tmp_path)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), wrapped(x), rtol=1e-5, atol=1e-6)
    assert sorted(h.targets) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]


def test_bias_keys_that_match_nothing_are_reported():
    """A ``lora_B`` bias or a LyCORIS ``b_norm`` on a layer without a bias: listed as unmatched
    (strict raises), never dropped in silence."""
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    sd = {"0.lora_A.weight": torch.ones(4, 8), "0.lora_B.weight": torch.ones(8, 4),
          "0.lora_B.bias": torch.ones(8)}
    h = apply_lora(model, sd, strict=False)
    assert h.unmatched == ["0.lora_B.bias"]
    h.remove()
    with pytest.raises(LoraError, match="match no tensor"):
        apply_lora(model, {"0.w_norm": torch.ones(8, 8), "0.b_norm": torch.ones(8)})


def test_biases_on_a_kohya_pair_fold_into_a_scaled_bias_delta():
    """``lora_up.bias`` / ``lora_down.bias`` (the pair's own layers' biases): the layer computes
    ``W x + b + s * (B (A x + a) + u)``, as the two small layers with their biases would."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    model = nn.Sequential(copy.deepcopy(layer))
    down, up = nn.Linear(32, 4), nn.Linear(4, 16)
    sd = {"0.lora_down.weight": down.weight.detach(), "0.lora_down.bias": down.bias.detach(),
          "0.lora_up.weight": up.weight.detach(), "0.lora_up.bias": up.bias.detach(),
          "0.alpha": torch.tensor(2.0)}
    x = torch.randn(5, 32)
    h = apply_lora(model, sd, scale=0.8)
    with torch.no_grad():
        expected = layer(x) + 0.8 * 0.5 * up(down(x))
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    h.remove()
    with torch.no_grad():
        assert torch.equal(model(x), layer(x))


def test_a_dora_with_pair_biases_and_bad_scales_are_errors():
    sd = {"0.lora_A.weight": torch.ones(4, 8), "0.lora_B.weight": torch.ones(8, 4),
          "0.lora_B.bias": torch.ones(8), "0.lora_magnitude_vector": torch.ones(8)}
    with pytest.raises(LoraError, match="DoRA with biases"):
        read_lora(sd)
    from ggufvideo.lora.bake import parse_lora_arg

    assert parse_lora_arg(r"C:\loras\x.safetensors:0.8") == (r"C:\loras\x.safetensors", 0.8)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    with pytest.raises(ValueError, match="finite number"):
        parse_lora_arg("x.safetensors:nan")
