"""Tiny T5/UMT5 text-encoder GGUFs written as llama.cpp's converter writes them (gguf-py's writer).

Names from gguf-py's name map (what llama.cpp's ``convert_hf_to_gguf.py`` calls), metadata under
``t5encoder.*``, a small unigram vocabulary under ``tokenizer.ggml.*`` -- so transformers'
``from_pretrained(dir, gguf_file=...)`` loads the same file as the reference.
"""

from __future__ import annotations

import os

import gguf
import torch
from gguf import GGMLQuantizationType as T
from model_files import add_gguf_tensor, close_gguf

WORDS = ("a", "cat", "dog", "walks", "on", "the", "beach", "at", "sunset", "red", "car", "in",
         "rain", "blurry", "low", "quality", "video", "of", "city", "night", "bright")


def vocabulary(size: int = 96) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a small T5-style unigram vocabulary of ``size`` pieces.

    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (T5's layout), then words with a leading ``▁``, single
    characters, and ``[PAD..]`` placeholders to fill ``size`` (what llama.cpp writes for T5's
    unused ids).
    """
    tokens = ["<pad>", "</s>", "<unk>", "▁"]
    types = [3, 3, 2, 1]
    tokens += ["▁" + w for w in WORDS]
    tokens += list("abcdefghijklmnopqrstuvwxyz,.!")
    types += [1] * (len(tokens) - len(types))
    scores = [0.0, 0.0, 0.0, -2.0] + [-3.0 - 0.1 * i for i in range(len(tokens) - 4)]
    i = 0
    while len(tokens) < size:
        tokens.append(f"[PAD{size - 1 - i}]")
        scores.append(0.0)
        types.append(5)
        i += 1
    return tokens, scores, types


# Text a video prompt holds: full-width punctuation (Wan's Chinese negative prompt), accents,
# emoji (bytes outside a small vocabulary), odd spacing.
SPM_CORPUS = ["a cat walks on the beach at sunset", "a red car in the rain at night",
              "blurry low quality video of a city", "bright colors, static, overexposed",
              "色调艳丽，过曝，静态，细节模糊不清，字幕", "风格，作品，画作，画面，静止，最差质量，低质量",
              "一只猫在海滩上散步", "JPEG压缩残留，丑陋的，残缺的"] * 25


def train_sentencepiece(folder: str | os.PathLike[str], *, byte_fallback: bool = True,
                        umt5_ids: bool = True, vocab_size: int = 400) -> str:
    """A small sentencepiece unigram model trained here (NFKC rules as T5's): the reference
    tokenizer. ``umt5_ids``: pad 0, eos 1, bos 2, unk 3; else T5's pad 0, eos 1, unk 2, no bos."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(os.fspath(folder), "spiece")
    ids = (dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if umt5_ids
           else dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS), model_prefix=prefix, model_type="unigram",
        vocab_size=vocab_size, byte_fallback=byte_fallback, character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, num_threads=1,
        minloglevel=2, **ids)
    return prefix + ".model"


def sentencepiece_vocabulary(model_file: str, size: int) -> dict:
    """The ``tokenizer.ggml.*`` values llama.cpp's T5 converter writes for a sentencepiece model:
    each id's piece, score and type (sentencepiece's numbering), ``[PADn]`` unused fillers up to
    the model's vocabulary size, the normalizer's flags and charsmap, the special ids."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    sp = spm.SentencePieceProcessor(model_file=model_file)
    tokens, scores, types = [f"[PAD{i}]" for i in range(size)], [-1000.0] * size, [5] * size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
                    else 6 if sp.IsByte(i) else 1)
    spec = proto.trainer_spec
    return {"tokens": tokens, "scores": scores, "types": types,
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
            "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces,
            "charsmap": bytes(proto.normalizer_spec.precompiled_charsmap),
            "unk": spec.unk_id, "eos": spec.eos_id, "pad": spec.pad_id, "bos": spec.bos_id,
            "processor": sp}


def build_encoder(umt5: bool = True, *, layers: int = 2, d_model: int = 64, heads: int = 4,
                  d_ff: int = 96, vocab: int = 96, gated: bool = True, seed: int = 0
                  ) -> torch.nn.Module:
    """A random transformers UMT5EncoderModel / T5EncoderModel (float32, eval)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg_cls, cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg = cfg_cls(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, num_heads=heads,
                  d_ff=d_ff, num_layers=layers, relative_attention_num_buckets=32,
                  feed_forward_proj="gated-gelu" if gated else "relu", layer_norm_epsilon=1e-6)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "relative" in name else 0.2))
    return model


def llama_cpp_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors under llama.cpp's names, as its converter maps them (gguf-py)."""
    n = model.config.num_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n)
    out = {}
    for name, t in model.state_dict().items():
        if name == "encoder.embed_tokens.weight":  # tied to shared.weight; the converter skips it
            continue
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        out[new] = t
    return out


def write_text_encoder(path: str | os.PathLike[str], model: torch.nn.Module, qtype: T = T.Q8_0,
                       *, name: str | None = None, arch: str = "t5encoder",
                       vocab: dict | None = None) -> str:
    """Write ``model`` as a llama.cpp text-encoder GGUF (norms F32, bias tables F16); its
    vocabulary :func:`vocabulary`'s, or ``vocab`` (:func:`sentencepiece_vocabulary`)."""
    cfg = model.config
    umt5 = type(model).__name__.startswith("UMT5")
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(name or ("umt5-tiny" if umt5 else "t5-tiny"))
    w.add_context_length(512)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_key_length(cfg.d_kv)
    w.add_value_length(cfg.d_kv)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    w.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    w.add_decoder_start_token_id(0)
    if vocab is None:
        tokens, scores, types = vocabulary(cfg.vocab_size)
        vocab = {"tokens": tokens, "scores": scores, "types": types, "add_space_prefix": True,
                 "remove_extra_whitespaces": True, "charsmap": b"", "unk": 2, "eos": 1, "pad": 0,
                 "bos": -1}
    w.add_tokenizer_model("t5")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_add_space_prefix(vocab["add_space_prefix"])
    w.add_remove_extra_whitespaces(vocab["remove_extra_whitespaces"])
    if vocab["charsmap"]:
        w.add_precompiled_charsmap(vocab["charsmap"])
    w.add_eos_token_id(vocab["eos"])
    w.add_unk_token_id(vocab["unk"])
    w.add_pad_token_id(vocab["pad"])
    if vocab["bos"] >= 0:
        w.add_bos_token_id(vocab["bos"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(True)
    for key, t in llama_cpp_state_dict(model).items():
        arr = t.detach().float().numpy()
        if arr.ndim == 1 or "norm" in key:
            add_gguf_tensor(w, key, arr, T.F32)
        elif "attn_rel_b" in key:
            add_gguf_tensor(w, key, arr, T.F16)
        else:
            add_gguf_tensor(w, key, arr, qtype)
    return close_gguf(w, path)
