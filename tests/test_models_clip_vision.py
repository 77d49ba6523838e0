"""The CLIP vision family (Wan 2.1 I2V's image encoder): config read off the shapes."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from ggufvideo.models import describe  # noqa: E402


def _shapes(hidden: int, layers: int, patch: int, image: int, inter: int, projection: int = 0):
    v = "vision_model"
    out = {f"{v}.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
           f"{v}.embeddings.class_embedding": (hidden,),
           f"{v}.embeddings.position_embedding.weight": ((image // patch) ** 2 + 1, hidden),
           f"{v}.pre_layrnorm.weight": (hidden,), f"{v}.post_layernorm.weight": (hidden,)}
    for i in range(layers):
        p = f"{v}.encoder.layers.{i}"
        for n in ("q", "k", "v", "out"):
            out[f"{p}.self_attn.{n}_proj.weight"] = (hidden, hidden)
        out[f"{p}.mlp.fc1.weight"] = (inter, hidden)
        out[f"{p}.mlp.fc2.weight"] = (hidden, inter)
    if projection:
        out["visual_projection.weight"] = (projection, hidden)
    return out


@pytest.mark.parametrize("hidden, layers, patch, image, inter, heads, act, label", [
    (1280, 32, 14, 224, 5120, 16, "gelu", "ViT-H/14"),       # clip_vision_h (Wan 2.1 I2V)
    (1024, 24, 14, 224, 4096, 16, "quick_gelu", "ViT-L/14"),  # OpenAI's
])
def test_released_towers(hidden, layers, patch, image, inter, heads, act, label):
    desc = describe(_shapes(hidden, layers, patch, image, inter, projection=1024))
    cfg = desc.config
    assert desc.class_name == "CLIPVisionModel" and label in desc.variant
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["patch_size"], cfg["image_size"],
            cfg["intermediate_size"], cfg["num_attention_heads"], cfg["hidden_act"]) == (
        hidden, layers, patch, image, inter, heads, act)
    transformers.CLIPVisionConfig(**cfg)  # a config transformers takes


def test_a_single_file_builds_the_same_model(tmp_path):
    import torch
    from safetensors.torch import save_file

    import ggufvideo

    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=1, patch_size=8, image_size=32,
                                        hidden_act="gelu", projection_dim=32)
    torch.manual_seed(0)
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()  # its projection is left out
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "clip.st")
    (tmp_path / "clip.st").rename(tmp_path / "clip.safetensors")
    built = ggufvideo.from_gguf(tmp_path / "clip.safetensors")
    assert type(built) is transformers.CLIPVisionModel
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(built(x, output_hidden_states=True).hidden_states[-2],
                           ref(x, output_hidden_states=True).hidden_states[-2])
