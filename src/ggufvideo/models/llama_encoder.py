"""Llama-family text encoders (HunyuanVideo: llava-llama-3-8b's language model), as transformers
builds them.

Layouts: transformers' ``LlamaModel`` (``embed_tokens``, ``layers.N.self_attn.q_proj``,
``layers.N.mlp.gate_proj``, ``norm``; the canonical layout -- a ``LlamaForCausalLM`` checkpoint's
``model.`` prefix is a container prefix) and llama.cpp's (``token_embd``, ``blk.N.attn_q``,
``blk.N.ffn_gate``, ``output_norm``; architecture ``llama``), whose names come from gguf-py's
tables (:mod:`ggufvideo.models.gguf_names`).

The class is ``LlamaModel``, the decoder stack without the LM head: what diffusers'
``HunyuanVideoPipeline`` takes as ``text_encoder`` (it reads hidden states, never logits). A
file's ``output.weight`` (the LM head) is left out by :func:`ggufvideo.from_gguf`, as T5's decoder
is; ``load_model`` into a ``LlamaForCausalLM`` still takes it.

llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` for its rotary layout
(``LlamaModel.permute`` in ``convert_hf_to_gguf.py``): per head of ``d`` rows, transformers'
order ``[first half, second half]`` becomes interleaved pairs ``(0, d/2), (1, d/2+1), ...``, with
the key/value head count for ``attn_k``. The rules undo it (:attr:`Rule.rows`) with the head
counts from the file's metadata (``llama.attention.head_count`` / ``head_count_kv``); for quantized
weights that is a gather of whole rows of raw blocks, exact.

Config from shapes: the embedding gives vocabulary and width, the FFN its width; the head counts
are only in the metadata (read by ``metadata_config``; without it 128-wide heads are assumed, the
width of every Llama 2/3). RMS epsilon, rope theta and context length come from the metadata too.
Not handled: rope scaling (Llama 3.1's ``rope_freqs`` tensor is reported as unexpected).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ModelLoadError
from .base import Family, Shapes
from .gguf_names import llama_cpp_rules

_L = "layers.{i}"

#: transformers' module templates of a ``LlamaModel``; gguf-py says what llama.cpp calls each.
HF_TEMPLATES: tuple[str, ...] = (
    "embed_tokens",
    f"{_L}.input_layernorm",
    f"{_L}.self_attn.q_proj", f"{_L}.self_attn.k_proj", f"{_L}.self_attn.v_proj",
    f"{_L}.self_attn.o_proj",
    f"{_L}.post_attention_layernorm",
    f"{_L}.mlp.gate_proj", f"{_L}.mlp.up_proj", f"{_L}.mlp.down_proj",
    "norm",
)

#: The head width every Llama 2/3 model uses, for a file whose metadata gives no head count.
HEAD_DIM = 128


def _heads(context: Mapping[str, Any], kv: bool) -> int:
    """The (key/value) head count: the file's metadata, or a config's ``num_*`` keys."""
    arch = context.get("general.architecture", "llama")
    if arch != "llama":  # other llama.cpp architectures share the names, not this permutation
        raise ModelLoadError(f"a Llama text encoder's q/k rows are read in llama.cpp's rotary "
                             f"order for architecture 'llama'; this file's is {arch!r}")
    n = context.get(f"{arch}.attention.head_count", context.get("num_attention_heads"))
    if kv:
        n = context.get(f"{arch}.attention.head_count_kv",
                        context.get("num_key_value_heads", n))
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        key = f"{arch}.attention.head_count" + ("_kv" if kv else "")
        raise ModelLoadError(f"llama.cpp stores attn_q/attn_k rows in its rotary order; undoing it "
                             f"needs the head count, and the file's metadata has no usable "
                             f"{key!r} ({n!r})")
    return n


def rope_order(rows: int, heads: int) -> list[int]:
    """``p`` with ``transformers_rows = llama_cpp_rows[p]`` for a q/k weight of ``heads`` heads.

    llama.cpp's row ``h*d + 2*j + s`` is transformers' row ``h*d + s*d/2 + j`` (``s`` in 0, 1).
    """
    if heads <= 0 or rows % (2 * heads):
        raise ModelLoadError(f"{rows} q/k rows do not split into {heads} heads of an even width")
    d = rows // heads
    half = d // 2
    return [h * d + 2 * j + s for h in range(heads) for s in range(2) for j in range(half)]


def _q_order(rows: int, context: Mapping[str, Any]) -> list[int]:
    return rope_order(rows, _heads(context, kv=False))


def _k_order(rows: int, context: Mapping[str, Any]) -> list[int]:
    return rope_order(rows, _heads(context, kv=True))


RULES = llama_cpp_rules("llama", HF_TEMPLATES, rows={f"{_L}.self_attn.q_proj": _q_order,
                                                     f"{_L}.self_attn.k_proj": _k_order})


def infer_config(s: Shapes) -> dict[str, Any]:
    """transformers' ``LlamaConfig`` fields from the tensors' shapes (heads: see the module)."""
    vocab, hidden = s.require("embed_tokens.weight", "the vocabulary and width", ndim=2)
    layers = s.count("layers.{i}.*")
    q_rows = s.require(f"{_L.format(i=0)}.self_attn.q_proj.weight", "the attention width",
                       ndim=2)[0]
    k_rows = s.require(f"{_L.format(i=0)}.self_attn.k_proj.weight", "the key/value width",
                       ndim=2)[0]
    ffn = s.require(f"{_L.format(i=0)}.mlp.gate_proj.weight", "the FFN width", ndim=2)[0]
    config: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, q_rows // HEAD_DIM),
        "num_key_value_heads": max(1, k_rows // HEAD_DIM),
        "rms_norm_eps": 1e-5,
        "attention_bias": s.has(f"{_L.format(i=0)}.self_attn.q_proj.bias"),
        "mlp_bias": s.has(f"{_L.format(i=0)}.mlp.gate_proj.bias"),
        "architectures": ["LlamaModel"],
    }
    if q_rows != hidden:  # heads narrower or wider than hidden / heads
        config["head_dim"] = HEAD_DIM
    return config


def class_name(config: Mapping[str, Any]) -> str:
    return "LlamaModel"


_SIZES = {(4096, 32): "8B", (2048, 16): "1B", (3072, 28): "3B", (5120, 40): "13B"}


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    size = _SIZES.get((config["hidden_size"], config["num_hidden_layers"]))
    return (f"Llama {size} encoder" if size else
            f"Llama encoder (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers)")


FAMILY: Family[Any] = Family(
    name="llama-text-encoder",
    title="Llama text encoder",
    kind="text-encoder",
    architectures=("llama",),
    signatures={
        "diffusers": (("layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight",
                       "norm.weight"),),
        "llama.cpp": (("blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "output_norm.weight",
                       "token_embd.weight"),),
    },
    rules={"llama.cpp": RULES},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
    library="transformers",
    metadata_config={"attention.head_count": "num_attention_heads",
                     "attention.head_count_kv": "num_key_value_heads",
                     "attention.key_length": "head_dim",
                     "attention.layer_norm_rms_epsilon": "rms_norm_eps",
                     "rope.freq_base": "rope_theta",
                     "context_length": "max_position_embeddings"},
    unused=("output.*", "lm_head.*"),
)
