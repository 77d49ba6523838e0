"""The HunyuanVideo transformer family: layouts against diffusers' converter, inferred config."""

from __future__ import annotations

import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_hunyuan_video_transformer_to_diffusers,
)
from family_checks import (  # noqa: E402
    check_against_diffusers_converter,
    check_config_inference,
    check_exact_row_splits,
    random_state_dict,
)

from ggufvideo.errors import ModelLoadError, UnknownModelError  # noqa: E402
from ggufvideo.models import ShapeOps, describe, get_family  # noqa: E402

HY = get_family("hunyuan-video")

# Tiny configs (head width 32 here: the per-head q/k norms tell it; the release's is 128).
BASE = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32,
            num_layers=1, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
            patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=32,
            pooled_projection_dim=24, rope_axes_dim=(8, 12, 12))
VARIANTS = {
    "t2v": (BASE, "T2V", ()),
    "i2v-33ch": ({**BASE, "in_channels": 33, "guidance_embeds": False,
                  "image_condition_type": "latent_concat"}, "I2V", ()),
    # the token-replace I2V has T2V's tensors: its condition type cannot be read off the shapes
    "i2v-token-replace": ({**BASE, "image_condition_type": "token_replace"}, "T2V",
                          ("image_condition_type",)),
    "no-guidance": ({**BASE, "guidance_embeds": False, "in_channels": 32}, "I2V", ()),
    "patch-t2": ({**BASE, "patch_size_t": 2, "mlp_ratio": 4.0, "num_layers": 2}, "T2V", ()),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**VARIANTS[name][0])


def reference_converter(hidden: int):
    """diffusers' converter with its single-block width (hard-coded 3072, the release's) set to
    ``hidden``, so tiny models can be checked against it."""
    def patched(code: types.CodeType) -> types.CodeType:
        consts = tuple(patched(c) if isinstance(c, types.CodeType)
                       else hidden if type(c) is int and c == 3072 else c
                       for c in code.co_consts)
        return code.replace(co_consts=consts)

    fn = convert_hunyuan_video_transformer_to_diffusers
    return types.FunctionType(patched(fn.__code__), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


@pytest.mark.parametrize("name", VARIANTS)
def test_original_layout_matches_diffusers_converter(name):
    model = build(name)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    check_against_diffusers_converter(HY, "original", random_state_dict(model),
                                      reference_converter(hidden), prefix="")


@pytest.mark.parametrize("layout", ["diffusers", "original", "comfyui"])
@pytest.mark.parametrize("name", VARIANTS)
def test_config_inferred_from_shapes(name, layout):
    model = build(name)
    _, label, ignore = VARIANTS[name]
    check_config_inference(HY, model, layout, "hyvid", ignore=ignore)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert label in describe(shapes).variant


@pytest.mark.parametrize("layout", ["original", "comfyui"])
def test_quantized_weights_convert_exactly_both_ways(layout):
    sd = random_state_dict(build("t2v"))
    assert check_exact_row_splits(HY, layout, sd) > 10


def test_single_block_linear1_splits_by_linear2_rows():
    sd = random_state_dict(build("t2v"))
    from ggufvideo.models.tensors import TensorOps

    orig = HY.convert(sd, "diffusers", "original", TensorOps())
    b = "single_transformer_blocks.1"
    want = torch.cat([sd[f"{b}.attn.to_q.weight"], sd[f"{b}.attn.to_k.weight"],
                      sd[f"{b}.attn.to_v.weight"], sd[f"{b}.proj_mlp.weight"]])
    assert torch.equal(orig["single_blocks.1.linear1.weight"], want)
    shift, scale = orig["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(torch.cat([scale, shift]), sd["norm_out.linear.weight"])


@pytest.mark.parametrize("layout,drop", [("diffusers", "proj_out.weight"),
                                         ("original", "final_layer.linear.weight"),
                                         ("original", "vector_in.in_layer.weight")])
def test_missing_tensor_is_named(layout, drop):
    shapes = {k: tuple(v.shape) for k, v in build("t2v").state_dict().items()}
    renamed = HY.convert(shapes, "diffusers", layout, ShapeOps())
    del renamed[drop]
    want = {"final_layer.linear.weight": "proj_out.weight",
            "vector_in.in_layer.weight": "time_text_embed.text_embedder.linear_1.weight"}
    with pytest.raises(ModelLoadError, match=want.get(drop, drop).replace(".", r"\.")):
        describe(renamed, "hyvid")


def test_released_size_without_qk_norm_assumes_head_dim_128():
    dim = 3072
    shapes = {"x_embedder.proj.weight": (dim, 16, 1, 2, 2), "proj_out.weight": (64, dim),
              "context_embedder.proj_in.weight": (dim, 4096),
              "time_text_embed.timestep_embedder.linear_1.weight": (dim, 256),
              "time_text_embed.text_embedder.linear_1.weight": (dim, 768),
              "time_text_embed.guidance_embedder.linear_1.weight": (dim, 256)}
    for i in range(20):
        shapes[f"transformer_blocks.{i}.attn.to_q.weight"] = (dim, dim)
        shapes[f"transformer_blocks.{i}.ff.net.0.proj.weight"] = (4 * dim, dim)
    for i in range(40):
        shapes[f"single_transformer_blocks.{i}.attn.to_q.weight"] = (dim, dim)
    desc = describe(shapes, "hyvid")
    assert desc.config["num_attention_heads"] == 24
    assert desc.config["attention_head_dim"] == 128
    assert desc.config["mlp_ratio"] == 4.0
    assert desc.config["qk_norm"] is None
    assert "T2V 13B" in desc.variant


@pytest.mark.parametrize("extra", [dict(has_image_proj=True, image_proj_dim=48,
                                        has_clean_x_embedder=True),
                                   dict(has_clean_x_embedder=True)])
def test_framepack_config_inferred_from_shapes(extra):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoFramepackTransformer3DModel(**BASE, **extra)
    check_config_inference(HY, model, "diffusers", "hyvid")
    assert "FramePack" in describe({k: tuple(v.shape) for k, v in model.state_dict().items()}).variant


def _comfyui_name(key: str) -> str:
    """The release name ``key`` as ComfyUI's loader renames it for its own HunyuanVideo module
    (the substitutions it applies to every key, in its order)."""
    for a, b in (("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                 ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                 ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                 ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
                 ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."),
                 ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
                 ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
                 ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
                 (".q_norm.weight", ".norm.query_norm.scale"),
                 (".k_norm.weight", ".norm.key_norm.scale"),
                 ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
                 ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer.")):
        key = key.replace(a, b)
    return key


@pytest.mark.parametrize("name", ["t2v", "i2v-33ch"])
def test_comfyuis_own_names_are_a_layout(name):
    from ggufvideo.models.tensors import TensorOps

    sd = random_state_dict(build(name))
    orig = HY.convert(sd, "diffusers", "original", TensorOps())
    comfy = {_comfyui_name(k): v for k, v in orig.items()}
    assert comfy.keys() != orig.keys()
    assert HY.layout_of(set(comfy)) == "comfyui" and HY.layout_of(set(orig)) == "original"
    mine = HY.convert(sd, "diffusers", "comfyui", TensorOps())
    assert mine.keys() == comfy.keys() and all(torch.equal(mine[k], comfy[k]) for k in comfy)
    back = HY.convert(comfy, "comfyui", "diffusers", TensorOps())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    shapes = {k: tuple(v.shape) for k, v in comfy.items()}
    assert describe(shapes, "hyvid").detection.layout == "comfyui"


def test_a_lora_saved_from_comfyui_lands_on_diffusers_split_projections():
    from ggufvideo.lora import parse_lora
    from ggufvideo.lora.targets import resolve

    model = build("t2v")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hidden = shapes["transformer_blocks.0.attn.to_q.weight"][0]
    lora = parse_lora({
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, hidden),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(3 * hidden, 4),
        "diffusion_model.single_blocks.1.modulation.lin.lora_down.weight": torch.randn(4, hidden),
        "diffusion_model.single_blocks.1.modulation.lin.lora_up.weight":
            torch.randn(3 * hidden, 4)})
    res = resolve(lora, shapes)
    assert res.layout == "hunyuan-video:comfyui" and not res.unmatched
    assert {p.key for ps in res.weights.values() for p in ps} == {
        "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight",
        "transformer_blocks.0.attn.to_v.weight", "single_transformer_blocks.1.norm.linear.weight"}
    (k_piece,) = res.weights["transformer_blocks.0.attn.to_k.weight"]
    assert k_piece.lora_rows == (hidden, 2 * hidden)


def test_convert_writes_the_comfyui_layout_and_from_gguf_reads_it(tmp_path):
    import ggufvideo
    from ggufvideo import GGUFFile, convert

    model = build("t2v")
    src, dst = tmp_path / "hy.gguf", tmp_path / "hy_comfy.gguf"
    ggufvideo.save_state_dict(model.state_dict(), src, metadata={"general.architecture": "hyvid"})
    convert(src, dst, qtype=None, layout="comfyui")
    with GGUFFile(dst) as f:
        names = set(f.tensors)
    assert "double_blocks.0.img_attn.qkv.weight" in names
    assert "single_blocks.0.norm.query_norm.scale" in names
    back = ggufvideo.from_gguf(dst)
    assert type(back).__name__ == "HunyuanVideoTransformer3DModel"
    sd = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v.float(), sd[k].float()), k


def test_hunyuanvideo_1_5_is_named_not_built():
    shapes = {k: tuple(v.shape) for k, v in build("t2v").state_dict().items()}
    orig = HY.convert(shapes, "diffusers", "original", ShapeOps())
    orig["byt5_in.fc1.weight"] = (64, 32)  # 1.5's glyph-text (ByT5) input
    with pytest.raises(UnknownModelError, match="HunyuanVideo 1.5.*byt5_in"):
        describe(orig, "hyvid")


def test_flux_blocks_named_like_comfyuis_hunyuanvideo_are_not_taken_for_it():
    # Flux's double/single blocks carry the names ComfyUI gives HunyuanVideo's; its img_in is a
    # plain linear where HunyuanVideo's is a patch embedding (img_in.proj)
    shapes = {"img_in.weight": (64, 64), "txt_in.weight": (64, 32),
              "double_blocks.0.img_attn.qkv.weight": (192, 64),
              "double_blocks.0.img_mod.lin.weight": (384, 64),
              "single_blocks.0.modulation.lin.weight": (192, 64), "final_layer.linear.weight":
              (64, 64)}
    with pytest.raises(UnknownModelError, match="no known model family"):
        describe(shapes, "flux")
