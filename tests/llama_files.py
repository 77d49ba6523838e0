"""Tiny Llama text-encoder GGUFs written as llama.cpp's converter writes them (gguf-py's writer).

Names from gguf-py's name map, q/k rows permuted as ``convert_hf_to_gguf.py``'s
``LlamaModel.permute`` does (written out here, independently of the library's inverse), metadata
under ``llama.*`` and a small byte-level BPE (``gpt2``) vocabulary under ``tokenizer.ggml.*`` -- so
transformers' ``from_pretrained(dir, gguf_file=...)`` loads the same file as the reference.
"""

from __future__ import annotations

import os

import gguf
import torch
from gguf import GGMLQuantizationType as T
from model_files import add_gguf_tensor, close_gguf

MERGES = ("Ġ c", "a t", "Ġc at", "Ġ d", "o g", "Ġd og", "Ġ t", "h e", "Ġt he", "Ġ a")
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what a byte-level BPE vocabulary starts with)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 byte tokens, one token per merge, two control tokens."""
    tokens = _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
    types = [1] * len(tokens)
    tokens += list(SPECIALS)
    types += [3] * len(SPECIALS)
    return tokens, types, list(MERGES)


VOCAB = len(vocabulary()[0])


def build_llama(*, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                ffn: int = 96, seed: int = 0) -> torch.nn.Module:
    """A random transformers LlamaModel (float32, eval)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: per head, rows ``(2, d/2)`` -> ``(d/2, 2)``."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_cpp_state_dict(model: torch.nn.Module, lm_head: torch.Tensor | None = None
                         ) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names and row order, as its converter writes them."""
    cfg = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = {}
    for name, t in model.state_dict().items():
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        out[new] = t.contiguous()
    if lm_head is not None:
        out["output.weight"] = lm_head
    return out


def write_llama(path: str | os.PathLike[str], model: torch.nn.Module, qtype: T = T.Q8_0, *,
                lm_head: bool = False, skip: tuple[str, ...] = ()) -> str:
    """Write ``model`` as a llama.cpp GGUF (norms F32; weights ``qtype``: Q8_0, F16, F32...)."""
    cfg = model.config
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_name("llama-tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(SPECIALS[0]))
    w.add_eos_token_id(tokens.index(SPECIALS[1]))
    w.add_add_bos_token(True)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.2 if lm_head else None
    for key, t in llama_cpp_state_dict(model, head).items():
        if key in skip:
            continue
        arr = t.detach().float().numpy()
        add_gguf_tensor(w, key, arr, T.F32 if arr.ndim == 1 else qtype)
    return close_gguf(w, path)
