"""``ggufvideo.pipeline``: a diffusers Wan pipeline from GGUF files (or folders), parts checked first."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline  # noqa: E402
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

from ggufvideo import GGMLTensor, save_state_dict  # noqa: E402
from ggufvideo.demo_generate import (  # noqa: E402
    demo_vocabulary,
    save_text_encoder,
)
from ggufvideo.generation import VideoSizeError, check_video_size, contact_sheet, generate  # noqa: E402
from ggufvideo.pipelines import PipelineError, pipeline  # noqa: E402

# (parts, files: the demo parts and their GGUF files, fixtures of conftest.py)


def no_loading(monkeypatch):
    """Fail if any weights are loaded (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the parts were checked")

    monkeypatch.setattr("ggufvideo.building.from_gguf", refuse)


def test_pipeline_from_three_gguf_files(files):
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"])
    assert type(pipe) is WanPipeline
    assert type(pipe.text_encoder) is UMT5EncoderModel
    assert isinstance(pipe.text_encoder.shared.weight, GGMLTensor)
    assert isinstance(pipe.transformer.blocks[0].attn1.to_q.weight, GGMLTensor)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0
    assert pipe.tokenizer("a cat").input_ids == [4, 5, 1]  # from the file's vocabulary
    video = generate(pipe, "a cat", frames=5, height=32, width=32, steps=2, progress=False)
    assert video.shape == (5, 32, 32, 3) and video.min() >= 0 and video.max() <= 1
    again = generate(pipe, "a cat", frames=5, height=32, width=32, steps=2, progress=False)
    assert (video == again).all()  # seeded


def test_parts_may_be_diffusers_folders(parts, files, tmp_path):
    parts["transformer"].save_pretrained(tmp_path / "pipe" / "transformer")
    pipe = pipeline(transformer=tmp_path / "pipe", text_encoder=files["text_encoder"],
                    vae=files["vae"])
    assert not isinstance(pipe.transformer.blocks[0].attn1.to_q.weight, GGMLTensor)


def test_text_encoder_width_mismatch_is_named_before_loading(files, tmp_path, monkeypatch):
    te = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                     num_layers=2, relative_attention_num_buckets=32))
    path = str(tmp_path / "te32.gguf")
    save_text_encoder(te, path, vocabulary=demo_vocabulary(128))
    no_loading(monkeypatch)
    with pytest.raises(PipelineError, match=r"text encoder's width is 32 but the transformer "
                                            r"expects text embeddings of width 64.*te32.gguf"):
        pipeline(transformer=files["transformer"], text_encoder=path, vae=files["vae"])


def test_vae_latent_channels_mismatch_is_named(files, tmp_path, monkeypatch):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                           temperal_downsample=[False])
    path = str(tmp_path / "vae4.gguf")
    save_state_dict(vae.state_dict(), path)
    no_loading(monkeypatch)
    with pytest.raises(PipelineError, match="VAE has 4 latent channels but the transformer "
                                            "outputs 16"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"], vae=path)


def test_wrong_kind_of_file_is_named(files, monkeypatch):
    no_loading(monkeypatch)
    with pytest.raises(PipelineError, match="text_encoder must be a t5-encoder model; the file "
                                            "holds a Wan 2.1/2.2 VAE"):
        pipeline(transformer=files["transformer"], text_encoder=files["vae"], vae=files["vae"])


def test_experts_with_different_architectures_are_refused(parts, files, tmp_path, monkeypatch):
    from diffusers import WanTransformer3DModel

    other = WanTransformer3DModel(**{**parts["transformer"].config, "num_layers": 1})
    path = str(tmp_path / "expert2.gguf")
    save_state_dict(other.state_dict(), path)
    no_loading(monkeypatch)
    with pytest.raises(PipelineError, match="experts differ in num_layers: 2 .* 1"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], transformer_2=path)


def test_two_experts_make_an_a14b_style_pipeline(files, tmp_path):
    import shutil

    low = shutil.copy(files["transformer"], tmp_path / "low_noise.gguf")
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"], transformer_2=low)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875


def test_image_to_video_transformer_gives_the_i2v_pipeline(parts, files, tmp_path):
    from diffusers import WanTransformer3DModel

    i2v = WanTransformer3DModel(**{**parts["transformer"].config, "in_channels": 36})
    path = str(tmp_path / "i2v.gguf")
    save_state_dict(i2v.state_dict(), path)
    pipe = pipeline(transformer=path, text_encoder=files["text_encoder"], vae=files["vae"])
    assert type(pipe) is WanImageToVideoPipeline
    clip = WanTransformer3DModel(**{**parts["transformer"].config, "in_channels": 36,
                                    "image_dim": 32, "added_kv_proj_dim": 256})
    path = str(tmp_path / "i2v21.gguf")
    save_state_dict(clip.state_dict(), path)
    with pytest.raises(PipelineError, match="Wan 2.1 image-to-video model: it needs "
                                            "image_encoder="):
        pipeline(transformer=path, text_encoder=files["text_encoder"], vae=files["vae"])


def test_text_encoder_without_vocabulary_needs_a_tokenizer(parts, files, tmp_path):
    path = str(tmp_path / "te-novocab.gguf")
    save_state_dict({k: v for k, v in parts["text_encoder"].state_dict().items()
                     if k != "encoder.embed_tokens.weight"}, path)
    with pytest.raises(PipelineError, match="no tokenizer.*pass tokenizer="):
        pipeline(transformer=files["transformer"], text_encoder=path, vae=files["vae"])


def test_missing_part_is_named(files):
    with pytest.raises(FileNotFoundError, match="vae: no such file or folder: .*nope.gguf"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae="nope.gguf")


@pytest.mark.parametrize("frames,h,w,msg", [(32, 480, 832, "4k\\+1 frames .*29 or 33"),
                                              (33, 470, 832, "--height 470: must be a multiple "
                                                             "of 16 .*464 or 480"),
                                              (33, 480, 8, "--width 8")])
def test_video_size_errors(frames, h, w, msg):
    with pytest.raises(VideoSizeError, match=msg):
        check_video_size(frames, h, w)


def test_contact_sheet_grid(tmp_path):
    from PIL import Image

    frames = torch.rand(9, 8, 12, 3).numpy()
    path = contact_sheet(frames, tmp_path / "s.png", count=8, columns=4)
    assert Image.open(path).size == (4 * 12, 2 * 8)


def test_generate_cli_writes_video_and_contact_sheet(files, tmp_path, capsys):
    from ggufvideo.cli import main

    out = tmp_path / "out.mp4"
    rc = main(["generate", "--model", files["transformer"], "--text-encoder",
               files["text_encoder"], "--vae", files["vae"], "--prompt", "a dog in rain",
               "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "-q",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.stat().st_size > 0 and (tmp_path / "out.png").is_file()
    import imageio.v3 as iio

    assert iio.imread(out).shape[:3] == (5, 32, 32)


def test_generate_cli_rejects_bad_size_before_loading(tmp_path, capsys):
    from ggufvideo.cli import main

    rc = main(["generate", "--model", "missing.gguf", "--text-encoder", "x", "--vae", "y",
               "--prompt", "p", "--frames", "10", "-o", str(tmp_path / "o.mp4")])
    assert rc == 1 and "--frames 10" in capsys.readouterr().err


def test_generate_cli_names_mismatched_parts(files, tmp_path, capsys):
    from ggufvideo.cli import main

    rc = main(["generate", "--model", files["transformer"], "--text-encoder", files["vae"],
               "--vae", files["vae"], "--prompt", "p", "-o", str(tmp_path / "o.mp4")])
    assert rc == 1 and "text_encoder must be a t5-encoder model" in capsys.readouterr().err


def test_vae_may_be_a_comfyui_style_safetensors_file(parts, files, tmp_path):
    """The VAE most setups hold is a single safetensors file in the original release's names."""
    from safetensors.torch import save_file

    from ggufvideo.models import get_family
    from ggufvideo.models.tensors import TensorOps

    sd = {k: v.detach().contiguous() for k, v in parts["vae"].state_dict().items()}
    vae_file = tmp_path / "wan_2.1_vae.safetensors"
    save_file(get_family("wan-vae").convert(sd, "diffusers", "original", TensorOps()), vae_file)
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=vae_file)
    for k, v in sd.items():
        assert torch.equal(pipe.vae.state_dict()[k], v), k


def _lora_file(transformer, path, seed, prefix="diffusion_model.blocks.0.self_attn.q"):
    """A kohya-style LoRA on the first block's query projection, in the original names."""
    from safetensors.torch import save_file

    n, k = transformer.blocks[0].attn1.to_q.weight.shape
    g = torch.Generator().manual_seed(seed)
    save_file({f"{prefix}.lora_down.weight": torch.randn(4, k, generator=g),
               f"{prefix}.lora_up.weight": torch.randn(n, 4, generator=g),
               f"{prefix}.alpha": torch.tensor(4.0)}, path)
    return str(path)


def test_loras_go_on_their_expert_and_come_off(parts, files, tmp_path):
    """``loras`` on the transformer (the high-noise expert), ``loras_2`` on the low-noise one,
    unmerged; the handles on the pipeline take them off again."""
    hi = _lora_file(parts["transformer"], tmp_path / "hi.safetensors", 1)
    lo = _lora_file(parts["transformer"], tmp_path / "lo.safetensors", 2)
    import shutil

    low = shutil.copy(files["transformer"], tmp_path / "low_noise.gguf")
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"], transformer_2=low,
                    loras=[(hi, 0.5)], loras_2=[(lo, 1.0)])
    a, b = pipe.ggufvideo_loras
    assert (a.source, a.scale, b.source, b.scale) == (hi, 0.5, lo, 1.0)
    (on_hi,) = pipe.transformer.blocks[0].attn1.to_q.lora_adapters
    (on_lo,) = pipe.transformer_2.blocks[0].attn1.to_q.lora_adapters
    assert on_hi.scale == 0.5 and on_lo.scale == 1.0 and not torch.equal(on_hi.up, on_lo.up)
    run = dict(frames=5, height=32, width=32, steps=2, progress=False)
    with_loras = generate(pipe, "a cat", **run)
    for h in pipe.ggufvideo_loras:
        h.remove()
    plain = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                     vae=files["vae"], transformer_2=low)
    assert (generate(pipe, "a cat", **run) == generate(plain, "a cat", **run)).all()
    assert not (with_loras == generate(plain, "a cat", **run)).all()


def test_a_bad_lora_is_named_before_any_weight_is_read(files, tmp_path, monkeypatch):
    from ggufvideo.errors import LoraError

    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"blocks.0.q.weight": torch.ones(2, 2)}, bad)
    no_loading(monkeypatch)
    with pytest.raises(LoraError, match="bad.safetensors"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], loras=[(bad, 1.0)])
    with pytest.raises(PipelineError, match="loras_2 are for the low-noise expert"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], loras_2=[(bad, 1.0)])


def test_generate_cli_takes_loras(parts, files, tmp_path, capsys):
    from ggufvideo.cli import main

    lora = _lora_file(parts["transformer"], tmp_path / "style.safetensors", 3)
    common = ["generate", "--model", files["transformer"], "--text-encoder",
              files["text_encoder"], "--vae", files["vae"], "--prompt", "a dog", "--frames", "5",
              "--height", "32", "--width", "32", "--steps", "2", "-q"]
    assert main([*common, "--lora", f"{lora}:0.7", "-o", str(tmp_path / "a.mp4")]) == 0
    rc = main([*common, "--lora", str(tmp_path / "missing.safetensors"),
               "-o", str(tmp_path / "b.mp4")])
    assert rc == 1 and "missing.safetensors" in capsys.readouterr().err
    rc = main([*common, "--lora-2", lora, "-o", str(tmp_path / "c.mp4")])
    assert rc == 1 and "low-noise expert" in capsys.readouterr().err


def test_lora_entries_may_be_paths_or_file_scale_text(parts, files, tmp_path):
    lora = _lora_file(parts["transformer"], tmp_path / "style.safetensors", 4)
    pipe = pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                    vae=files["vae"], loras=[lora, f"{lora}:0.25"])
    assert [h.scale for h in pipe.ggufvideo_loras] == [1.0, 0.25]
    with pytest.raises(TypeError, match="a LoRA entry is"):
        pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                 vae=files["vae"], loras=[(lora, 0.5, "extra")])


def test_a_lora_that_does_not_fit_the_transformer_is_named_before_loading(parts, files,
                                                                          tmp_path, monkeypatch):
    """A LoRA made for another model size, or for layers the file lacks: refused from the GGUF
    header, before any weight is read (as apply_lora would refuse it after)."""
    from safetensors.torch import save_file

    from ggufvideo.errors import LoraError

    n, k = parts["transformer"].blocks[0].attn1.to_q.weight.shape
    wrong = tmp_path / "for_another_size.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, k + 64),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(n, 4)}, wrong)
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file({"diffusion_model.blocks.99.self_attn.q.lora_down.weight": torch.ones(4, k),
               "diffusion_model.blocks.99.self_attn.q.lora_up.weight": torch.ones(n, 4)},
              elsewhere)
    no_loading(monkeypatch)
    for path, message in ((wrong, "does not fit"), (elsewhere, "match no tensor of transformer")):
        with pytest.raises(LoraError, match=message) as info:
            pipeline(transformer=files["transformer"], text_encoder=files["text_encoder"],
                     vae=files["vae"], loras=[(path, 1.0)])
        assert path.name in str(info.value)
