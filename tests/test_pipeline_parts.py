"""The pipeline's parts and options checked before any weight is read, one test per promised
error, and the inputs users hold: ComfyUI's single-file CLIP vision encoder, a tokenizer given as
a GGUF file or a ``spiece.model``, Wan 2.2 TI2V with an image."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ggufvideo import save_state_dict  # noqa: E402
from ggufvideo.cli import main  # noqa: E402
from ggufvideo.pipeline_parts import PipelineError  # noqa: E402
from ggufvideo.pipelines import pipeline  # noqa: E402

# (parts, files: the demo parts and their GGUF files, fixtures of conftest.py)


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the parts were checked")

    monkeypatch.setattr("ggufvideo.building.from_gguf", refuse)


def _variant(parts, tmp_path, name, **changes):
    model = WanTransformer3DModel(**{**parts["transformer"].config, **changes})
    path = str(tmp_path / name)
    save_state_dict(model.state_dict(), path)
    return path


def _vae22(tmp_path):
    """A tiny Wan 2.2 VAE file (z=48, 16x spatial compression: TI2V-5B's)."""
    from diffusers import AutoencoderKLWan

    vae22 = AutoencoderKLWan(base_dim=32, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True], is_residual=True,
                             in_channels=12, out_channels=12, patch_size=2,
                             scale_factor_spatial=16, decoder_base_dim=32)
    path = str(tmp_path / "vae22.gguf")
    save_state_dict(vae22.state_dict(), path)
    return path


def _base(files, **kw):
    return {"transformer": files["transformer"], "text_encoder": files["text_encoder"],
            "vae": files["vae"], **kw}


# -- options that do not fit the parts ---------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(boundary_ratio=0.9), r"boundary_ratio=0.9 is where a second expert takes over"),
    (dict(image_to_video=True), r"text-to-video model: it takes no image"),
    (dict(image_encoder="clip_vision_h.safetensors"), r"takes no image embeddings"),
])
def test_options_a_text_to_video_model_has_no_use_for(files, no_loading, kw, match):
    with pytest.raises(PipelineError, match=match):
        pipeline(**_base(files, **kw))


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_a_boundary_outside_0_1_is_refused(files, tmp_path, no_loading, ratio):
    low = shutil.copy(files["transformer"], tmp_path / "low.gguf")
    with pytest.raises(PipelineError, match="strictly between 0 and 1"):
        pipeline(**_base(files, transformer_2=low, boundary_ratio=ratio))


def test_the_same_file_twice_and_swapped_experts(files, tmp_path, no_loading):
    with pytest.raises(PipelineError, match="are the same file"):
        pipeline(**_base(files, transformer_2=files["transformer"]))
    low = shutil.copy(files["transformer"], tmp_path / "wan2.2_t2v_low_noise_14B.gguf")
    high = shutil.copy(files["transformer"], tmp_path / "wan2.2_t2v_high_noise_14B.gguf")
    with pytest.warns(UserWarning, match="named low-noise .* high-noise.*swapped"), \
            pytest.raises(AssertionError, match="weights were loaded"):
        pipeline(**_base(files, transformer=low, transformer_2=high))


def test_i2v_experts_switch_at_0_9(parts, files, tmp_path):
    hi = _variant(parts, tmp_path, "hi.gguf", in_channels=36)
    lo = _variant(parts, tmp_path, "lo.gguf", in_channels=36)
    pipe = pipeline(**_base(files, transformer=hi, transformer_2=lo))
    assert type(pipe) is WanImageToVideoPipeline and pipe.config.boundary_ratio == 0.9


def test_an_i2v_model_without_an_image(parts, files, tmp_path, no_loading):
    i2v = _variant(parts, tmp_path, "i2v.gguf", in_channels=36)
    with pytest.raises(PipelineError, match="image-to-video model: it needs an image"):
        pipeline(**_base(files, transformer=i2v, image_to_video=False))


def test_a_t5_encoder_is_not_wans(files, tmp_path, no_loading):
    from transformers import T5Config, T5EncoderModel

    from ggufvideo.demo_generate import demo_vocabulary, save_text_encoder

    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=128,
                                 num_layers=2, feed_forward_proj="gated-gelu")).eval()
    path = str(tmp_path / "t5-v1_1-xxl-encoder.gguf")
    save_text_encoder(t5, path, vocabulary=demo_vocabulary(128))
    with pytest.raises(PipelineError, match="Wan's text encoder is UMT5-XXL.*is a T5 encoder"):
        pipeline(**_base(files, text_encoder=path))


def test_ftfy_is_asked_for_before_loading(parts, files, tmp_path, no_loading, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ftfy" else real(name, *a))
    i2v = _variant(parts, tmp_path, "i2v.gguf", in_channels=36)
    with pytest.raises(ImportError, match="image-to-video needs ftfy"):
        pipeline(**_base(files, transformer=i2v))


# -- files of the wrong kind -------------------------------------------------------------------


def test_a_lora_a_non_gguf_and_a_folder_of_the_wrong_kind(parts, files, tmp_path, no_loading):
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 256),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(256, 2)}, lora)
    with pytest.raises(PipelineError, match="the transformer is a LoRA file, not a model"):
        pipeline(**_base(files, transformer=str(lora)))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>not found</html>")
    with pytest.raises(PipelineError, match="named .gguf but is not a GGUF file"):
        pipeline(**_base(files, transformer=str(fake)))
    parts["vae"].save_pretrained(tmp_path / "vae_folder")
    with pytest.raises(PipelineError, match="transformer must be a WanTransformer3DModel.*"
                                            "AutoencoderKLWan"):
        pipeline(**_base(files, transformer=str(tmp_path / "vae_folder")))


# -- what users hold ---------------------------------------------------------------------------


def _clip_file(path, width):
    cfg = transformers.CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=2, num_attention_heads=max(1, width //
                                                                                     64),
                                        patch_size=14, image_size=224, hidden_act="gelu")
    torch.manual_seed(1)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def test_a_single_file_clip_vision_encoder(parts, files, tmp_path):
    """ComfyUI setups hold Wan 2.1 I2V's image encoder as one file (clip_vision_h.safetensors,
    transformers' names): built from it, with CLIP's own preprocessing."""
    i2v = _variant(parts, tmp_path, "i2v21.gguf", in_channels=36, image_dim=64,
                   added_kv_proj_dim=256)
    clip = tmp_path / "clip_vision_h.safetensors"
    ref = _clip_file(clip, 64)
    pipe = pipeline(**_base(files, transformer=i2v, image_encoder=str(clip)))
    assert type(pipe) is WanImageToVideoPipeline
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got = pipe.image_encoder(x, output_hidden_states=True).hidden_states[-2]
        want = ref(x, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(got, want)
    assert pipe.image_processor.crop_size["height"] == 224
    wrong = tmp_path / "clip_48.safetensors"
    _clip_file(wrong, 48)
    with pytest.raises(PipelineError, match="image encoder's width is 48 .* width 64"):
        pipeline(**_base(files, transformer=i2v, image_encoder=str(wrong)))
    with pytest.raises(FileNotFoundError, match="image encoder: no such file"):
        pipeline(**_base(files, transformer=i2v, image_encoder=str(tmp_path / "nope")))


def test_ti2v_with_an_image_is_an_image_to_video_pipeline(files, tmp_path):
    from ggufvideo.demo_generate import build_demo_parts as build

    p = build()
    ti2v = _variant({"transformer": p["transformer"]}, tmp_path, "ti2v.gguf", in_channels=48,
                    out_channels=48)
    vae_path = _vae22(tmp_path)
    pipe = pipeline(transformer=ti2v, text_encoder=files["text_encoder"], vae=vae_path,
                    image_to_video=True)
    assert type(pipe) is WanImageToVideoPipeline and pipe.config.expand_timesteps


def test_tokenizers_given_as_a_gguf_or_a_sentencepiece_model(parts, files, tmp_path):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from ggufvideo.comfy.loading import _spiece_model

    te = tmp_path / "umt5.safetensors"  # ComfyUI's kind of encoder file: no vocabulary in it
    save_file({k: v.contiguous() for k, v in parts["text_encoder"].state_dict().items()
               if k != "encoder.embed_tokens.weight"}, te)
    with pytest.raises(PipelineError, match="carries no tokenizer.*spiece.model"):
        pipeline(**_base(files, text_encoder=str(te)))
    via_gguf = pipeline(**_base(files, text_encoder=str(te), tokenizer=files["text_encoder"]))
    model = tmp_path / "spiece.model"
    model.write_bytes(bytes(_spiece_model(files["text_encoder"]).numpy().tobytes()))
    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    via_spm = pipeline(**_base(files, text_encoder=str(te), tokenizer=str(model)))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for text in ("a cat walks", "rain at night, blurry"):
        ids = sp.encode(text) + [1]
        assert via_gguf.tokenizer(text).input_ids == via_spm.tokenizer(text).input_ids == ids


# -- the command line's output checks ----------------------------------------------------------


def _cli(files, out, *extra):
    return main(["generate", "--model", files["transformer"], "--text-encoder",
                 files["text_encoder"], "--vae", files["vae"], "--prompt", "p", "--frames", "5",
                 "--height", "32", "--width", "32", "--steps", "1", "-q", "-o", str(out),
                 *extra])


def test_generate_checks_its_outputs_before_loading(files, tmp_path, capsys, no_loading):
    (tmp_path / "folder").mkdir()
    cases = [(tmp_path / "missing" / "o.mp4", "no folder"),
             (tmp_path / "o.png", "must end in one of .mp4"),
             (tmp_path / "folder", "is a folder")]
    for out, match in cases:
        assert _cli(files, out) == 1
        assert match in capsys.readouterr().err
    (tmp_path / "taken.mp4").write_bytes(b"x")
    assert _cli(files, tmp_path / "taken.mp4") == 1
    assert "already exist(s): pass --force" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "cat.png")
    assert _cli(files, tmp_path / "cat.mp4", "--image", str(tmp_path / "cat.png"), "--force") == 1
    assert "would overwrite the input image" in capsys.readouterr().err


def test_generate_takes_the_720p_shift_from_704(monkeypatch, files, tmp_path):
    seen = {}

    def fake(**kw):
        seen.update(kw)
        raise PipelineError("stop here")

    monkeypatch.setattr("ggufvideo.pipelines.pipeline", fake)
    main(["generate", "--model", files["transformer"], "--text-encoder", files["text_encoder"],
          "--vae", files["vae"], "--prompt", "p", "--height", "704", "--width", "1280", "-q",
          "-o", str(tmp_path / "o.mp4")])
    assert seen["flow_shift"] == 5.0 and seen["image_to_video"] is False


# -- second review: valid inputs kept, more wrong ones named --------------------------------------


def test_text_encoders_as_a_model_type_folder_a_module_and_a_one_block_file(parts, files,
                                                                           tmp_path):
    import json

    from ggufvideo.demo_generate import demo_vocabulary, save_text_encoder
    from ggufvideo.pipeline_parts import check_parts, describe_part

    te = parts["text_encoder"]
    te.save_pretrained(tmp_path / "te")
    cfg = json.loads((tmp_path / "te" / "config.json").read_text())
    cfg.pop("architectures", None)  # only model_type: "umt5"
    (tmp_path / "te" / "config.json").write_text(json.dumps(cfg))
    t, v = describe_part("transformer", files["transformer"]), describe_part("vae", files["vae"])
    for source in (str(tmp_path / "te"), te):
        check_parts(t, describe_part("text_encoder", source), v)
    one = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=1)).eval()
    path = str(tmp_path / "umt5-1layer.gguf")
    save_text_encoder(one, path, vocabulary=demo_vocabulary(128))
    check_parts(t, describe_part("text_encoder", path), v)  # one block cannot tell T5 from UMT5


def test_more_wrong_inputs_are_named(parts, files, tmp_path, no_loading):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(PipelineError, match="config.json is not JSON"):
        pipeline(**_base(files, vae=str(tmp_path / "bad")))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "notes.txt").write_text("x")
    with pytest.raises(PipelineError, match="the tokenizer folder holds no tokenizer"):
        pipeline(**_base(files, tokenizer=str(tmp_path / "tok")))
    i2v = _variant(parts, tmp_path, "i2v21.gguf", in_channels=36, image_dim=64,
                   added_kv_proj_dim=256)
    with pytest.raises(PipelineError, match="image encoder must be a CLIP vision model.*"
                                            "T5/UMT5 text encoder"):
        pipeline(**_base(files, transformer=i2v, image_encoder=files["text_encoder"]))
    from diffusers import WanVACETransformer3DModel

    vace = WanVACETransformer3DModel(**{**parts["transformer"].config, "vace_layers": [0],
                                        "vace_in_channels": 96})
    path = str(tmp_path / "vace.gguf")
    save_state_dict(vace.state_dict(), path)
    with pytest.raises(PipelineError, match="Wan VACE transformer.*WanVACEPipeline"):
        pipeline(**_base(files, transformer=path))


@pytest.mark.parametrize("low, high, warns", [
    ("Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf", "Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf", True),
    ("low_noise/model.gguf", "high_noise/model.gguf", True),
    ("slow_noise_a.gguf", "high_noise_b.gguf", False),
])
def test_swapped_expert_names(files, tmp_path, low, high, warns):
    import warnings as w

    from ggufvideo.pipeline_parts import check_experts, describe_part

    paths = []
    for name in (low, high):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        paths.append(shutil.copy(files["transformer"], tmp_path / name))
    a, b = (describe_part("transformer", p) for p in paths)
    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        check_experts(a, b, None)
    assert bool([x for x in seen if "swapped" in str(x.message)]) is warns


def test_a_lora_on_a_safetensors_transformer(parts, files, tmp_path):
    from ggufvideo.models import CANONICAL, get_family
    from ggufvideo.models.tensors import TensorOps

    wan = get_family("wan")
    sd = wan.convert(parts["transformer"].state_dict(), CANONICAL, "original", TensorOps())
    path = tmp_path / "wan_t2v.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 256),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(256, 2)}
    pipe = pipeline(**_base(files, transformer=str(path), loras=[(lora, 1.0)]))
    assert pipe.ggufvideo_loras[0].targets == ["blocks.0.attn1.to_q.weight"]


def test_generate_checks_ti2v_sizes_and_more_outputs_before_loading(files, tmp_path, capsys,
                                                                    no_loading):
    vae = _vae22(tmp_path)
    rc = main(["generate", "--model", files["transformer"], "--text-encoder",
               files["text_encoder"], "--vae", vae, "--prompt", "p", "--frames", "5",
               "--height", "48", "--width", "64", "-o", str(tmp_path / "o.mp4")])
    assert rc == 1 and "--height 48: must be a multiple of 32" in capsys.readouterr().err
    assert _cli(files, tmp_path / "o.webm") == 1
    assert "must end in one of .mp4" in capsys.readouterr().err
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")  # a dangling link
    assert _cli(files, tmp_path / "gone.mp4") == 1
    assert "already exist(s)" in capsys.readouterr().err
    (tmp_path / "sheet.png").mkdir()
    assert _cli(files, tmp_path / "sheet.mp4", "--force") == 1
    assert "would replace a folder" in capsys.readouterr().err
    assert _cli(files, tmp_path / "x.mp4", "--image", str(tmp_path / "no.png")) == 1
    assert "--image" in capsys.readouterr().err


def test_a_release_folder_of_shards_in_the_releases_names(parts, files, tmp_path):
    """Wan-AI's own folder: a config.json of its "WanModel" (not diffusers' config: qk_norm
    true, dim...) beside safetensors shards in the release's names. Read as one checkpoint; the
    config comes from the shapes, not from that config.json."""
    import json

    from ggufvideo.models import CANONICAL, get_family
    from ggufvideo.models.tensors import TensorOps

    sd = get_family("wan").convert(parts["transformer"].state_dict(), CANONICAL, "original",
                                   TensorOps())
    folder = tmp_path / "Wan2.1-T2V-1.3B"
    folder.mkdir()
    keys = sorted(sd)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: sd[k].contiguous() for k in part}, folder / name)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, part in halves.items() for k in part}}))
    (folder / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "dim": 256, "qk_norm": True, "num_heads": 2,
         "model_type": "t2v", "in_dim": 16, "out_dim": 16, "num_layers": 2}))
    pipe = pipeline(**_base(files, transformer=str(folder)))
    got = pipe.transformer.blocks[0].attn1.to_q.weight
    assert torch.equal(got.detach().float(), parts["transformer"].blocks[0].attn1.to_q.weight
                       .detach().float())


def test_release_layout_tokenizer_and_foreign_folders(parts, files, tmp_path, no_loading):
    """Wan-AI's release keeps the UMT5 tokenizer in google/umt5-xxl/ beside the encoder's .pth:
    found there. A folder of another diffusers class is refused by its class, not read as
    shards of a Wan model."""
    import json

    from ggufvideo.pipeline_parts import describe_part, resolve_tokenizer

    release = tmp_path / "Wan2.1-T2V-1.3B"
    (release / "google" / "umt5-xxl").mkdir(parents=True)
    te = release / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: v.clone() for k, v in parts["text_encoder"].state_dict().items()
                if k != "encoder.embed_tokens.weight"}, te)
    part = describe_part("text_encoder", str(te))
    with pytest.raises(PipelineError, match="the tokenizer folder holds no tokenizer"):
        resolve_tokenizer(part, None)  # google/umt5-xxl/ was looked in (empty here)
    (release / "google" / "umt5-xxl" / "spiece.model").write_bytes(b"")
    with pytest.raises(Exception, match="not a sentencepiece"):
        resolve_tokenizer(part, None)
    foreign = tmp_path / "qwen_vae"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage"}))
    save_file({"x": torch.zeros(1)}, foreign / "diffusion_pytorch_model.safetensors")
    with pytest.raises(PipelineError, match="vae must be a AutoencoderKLWan folder; its "
                                            "config.json names AutoencoderKLQwenImage"):
        pipeline(**_base(files, vae=str(foreign)))
