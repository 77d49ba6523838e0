"""The whole path of ``ggufvideo generate``, offline, on tiny models the demo builds.

Three random models with the real architectures -- transformers' ``UMT5EncoderModel``, diffusers'
``WanTransformer3DModel`` and ``AutoencoderKLWan`` -- are written as GGUF files the way the
published ones are: the text encoder with llama.cpp's tensor names and its vocabulary in
``tokenizer.ggml.*`` (:func:`save_text_encoder`), the transformer with the original release's
names, the VAE quantized. Then :func:`ggufvideo.pipelines.pipeline` builds a ``WanPipeline`` from
the three files (no network, no config) and a few frames are made and written. The output is
noise-like (random weights): what the demo shows is that every step runs on quantized weights.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
from torch import nn

from .writer import format_bytes

if TYPE_CHECKING:
    from transformers import T5EncoderModel, UMT5EncoderModel

__all__ = ["run_generate_demo", "write_demo_files", "build_demo_parts", "save_text_encoder",
           "demo_vocabulary", "DemoParts", "DEMO_WORDS"]

#: The demo vocabulary's words (a tokenizer needs one; a real file has 256k pieces).
DEMO_WORDS = ("a", "cat", "dog", "walks", "on", "the", "beach", "at", "sunset", "red", "car",
              "in", "rain", "blurry", "low", "quality", "video", "of", "city", "night")


def demo_vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a T5-style unigram vocabulary of ``size`` pieces."""
    tokens = ["<pad>", "</s>", "<unk>", "\u2581", *("\u2581" + w for w in DEMO_WORDS),
              *"abcdefghijklmnopqrstuvwxyz,.!"]
    types = [3, 3, 2] + [1] * (len(tokens) - 3)
    scores = [0.0, 0.0, 0.0] + [-2.0 - 0.1 * i for i in range(len(tokens) - 3)]
    if len(tokens) > size:
        raise ValueError(f"a vocabulary of {size} pieces cannot hold the demo's {len(tokens)}")
    pads = size - len(tokens)
    tokens += [f"[PAD{size - 1 - i}]" for i in range(pads)]
    return tokens, scores + [0.0] * pads, types + [5] * pads


class DemoParts(TypedDict):
    """The demo's three models, by pipeline role."""

    text_encoder: UMT5EncoderModel
    transformer: nn.Module
    vae: nn.Module


def save_text_encoder(model: T5EncoderModel | UMT5EncoderModel, path: str | os.PathLike[str], *,
                      vocabulary: tuple[Sequence[str], Sequence[float], Sequence[int]],
                      qtype: str = "Q8_0") -> Any:
    """Write a transformers T5/UMT5 encoder as llama.cpp's converter would: its tensor names
    (``token_embd``, ``enc.blk.N.attn_q``...), ``t5encoder.*`` metadata and the vocabulary as
    ``tokenizer.ggml.*`` (pad 0, eos 1, unk 2, as T5). Returns the writer's summary."""
    from gguf import GGUFValueType

    from .models import CANONICAL, get_family
    from .models.t5_encoder import llama_cpp_metadata
    from .models.tensors import TensorOps
    from .serialize import TypedValue
    from .writer import save_state_dict

    cfg = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    named = get_family("t5-encoder").convert(sd, CANONICAL, "llama.cpp", TensorOps())
    tokens, scores, types = vocabulary
    u32 = lambda v: TypedValue(GGUFValueType.UINT32, int(v))  # noqa: E731
    meta = {
        **llama_cpp_metadata(cfg.to_dict()),
        "general.name": type(model).__name__.removesuffix("EncoderModel").lower() + "-demo",
        "tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.scores": [float(s) for s in scores],
        "tokenizer.ggml.token_type": TypedValue(GGUFValueType.ARRAY, [int(t) for t in types],
                                                GGUFValueType.INT32),
        "tokenizer.ggml.eos_token_id": u32(1), "tokenizer.ggml.unknown_token_id": u32(2),
        "tokenizer.ggml.padding_token_id": u32(0), "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.add_space_prefix": True,
    }
    return save_state_dict(named, path, qtype=qtype, metadata=meta)


def build_demo_parts(seed: int = 0) -> DemoParts:
    """Tiny random UMT5 encoder (width 64), Wan transformer (text width 64) and Wan VAE."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    te = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=128,
                                     num_layers=2, relative_attention_num_buckets=32)).eval()
    # (cast: these are torch modules, but mypy does not see nn.Module among the bases of
    # diffusers' model classes)
    transformer = cast(nn.Module, WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=256, ffn_dim=512, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)).eval()
    vae = cast(nn.Module, AutoencoderKLWan(base_dim=16, z_dim=16)).eval()
    return {"text_encoder": te, "transformer": transformer, "vae": vae}


def write_demo_files(folder: str, parts: DemoParts | None = None,
                     qtype: str = "Q8_0") -> dict[str, str]:
    """The demo parts written as GGUF files in ``folder`` (role -> path): the text encoder with
    llama.cpp's names and vocabulary, the transformer with the original release's names."""
    from .models import CANONICAL, get_family
    from .models.tensors import TensorOps
    from .writer import save_state_dict

    parts = parts or build_demo_parts()
    paths = {role: os.path.join(folder, f"{role}-{qtype}.gguf") for role in parts}
    te_model = parts["text_encoder"]
    save_text_encoder(te_model, paths["text_encoder"],
                      vocabulary=demo_vocabulary(te_model.config.vocab_size), qtype=qtype)
    wan = get_family("wan")
    sd = {k: v.detach().contiguous() for k, v in parts["transformer"].state_dict().items()}
    save_state_dict(wan.convert(sd, CANONICAL, "original", TensorOps()), paths["transformer"],
                    qtype=qtype)
    save_state_dict({k: v.detach().contiguous() for k, v in parts["vae"].state_dict().items()},
                    paths["vae"], qtype=qtype)
    return paths


def run_generate_demo(folder: str, *, qtype: str = "Q8_0", frames: int = 5, size: int = 64,
                      steps: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the three tiny models as GGUF into ``folder``, build the pipeline from the files and
    make ``frames`` frames of ``size`` x ``size``; returns paths, sizes and timings."""
    from .generation import contact_sheet, generate, write_video
    from .model import parameter_bytes
    from .pipelines import pipeline

    paths = write_demo_files(folder, qtype=qtype)
    for role, p in paths.items():
        log(f"wrote {role}: {os.path.basename(p)} ({format_bytes(os.path.getsize(p))})")

    t0 = time.perf_counter()
    pipe = pipeline(transformer=paths["transformer"], text_encoder=paths["text_encoder"],
                    vae=paths["vae"])
    log(f"pipeline: {type(pipe).__name__} from 3 GGUF files in {time.perf_counter() - t0:.1f} s "
        f"(text encoder {type(pipe.text_encoder).__name__}, "
        f"{format_bytes(parameter_bytes(pipe.text_encoder))} of weights in RAM; transformer "
        f"{format_bytes(parameter_bytes(pipe.transformer))})")
    t0 = time.perf_counter()
    video = generate(pipe, "a cat walks on the beach at sunset",
                     negative_prompt="blurry, low quality", frames=frames, height=size,
                     width=size, steps=steps, guidance=5.0, seed=0, progress=False)
    seconds = time.perf_counter() - t0
    out = os.path.join(folder, "demo.mp4")
    sheet = contact_sheet(video, os.path.join(folder, "demo.png"))
    try:
        write_video(video, out, fps=8)
        wrote = f"{os.path.basename(out)} and {os.path.basename(sheet)}"
    except ImportError:
        out = ""
        wrote = f"{os.path.basename(sheet)} (no video writer: pip install 'ggufvideo[video]')"
    log(f"generated {video.shape[0]} frames of {size}x{size} in {steps} steps "
        f"({seconds:.1f} s): {wrote}")
    return {"paths": paths, "video": out, "sheet": sheet, "frames": video,
            "pipeline": type(pipe).__name__, "seconds": seconds}
