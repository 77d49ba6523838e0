"""T5 and UMT5 text encoders (Wan: UMT5-XXL; LTX-Video: T5-XXL), as transformers builds them.

Layouts: transformers' (``UMT5EncoderModel`` / ``T5EncoderModel``: ``shared``,
``encoder.block.N.layer.0.SelfAttention.q``...; the canonical layout) and llama.cpp's, which the
published text-encoder GGUFs use (``token_embd``, ``enc.blk.N.attn_q``, ``enc.blk.N.attn_rel_b``,
``enc.blk.N.ffn_gate/up/down``, ``enc.output_norm``; architecture ``t5encoder``, or ``t5`` for a
whole encoder-decoder file whose ``dec.*`` tensors an encoder does not use), and Wan's own
(``token_embedding``, ``blocks.N.attn.q``, ``blocks.N.ffn.gate.0``: the release's
``models_t5_umt5-xxl-enc-bf16.pth``). The llama.cpp names come from gguf-py's tables
(:mod:`ggufvideo.models.gguf_names`).

T5 vs UMT5: UMT5 has a relative-attention bias in every block, T5 only in the first. A gated FFN
(``ffn_gate`` present: T5 v1.1, FLAN-T5, UMT5) is ``gated-gelu``; without it, the original T5's
``relu``. ``wi`` (ungated) and ``wi_1`` (gated) are both llama.cpp's ``ffn_up``.

Config from shapes: the embedding gives vocabulary and width, the bias table the heads and buckets,
q's rows the inner width, the FFN its width. The layer-norm epsilon comes from the file's metadata
when present (``t5encoder.attention.layer_norm_epsilon``), else T5's 1e-6; the relative-attention
maximum distance is in no file and every released model uses 128.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family, Rule, Shapes, rename
from .gguf_names import llama_cpp_rules

_ATTN = "encoder.block.{i}.layer.0"
_FFN = "encoder.block.{i}.layer.1"


def _gated(captures: Mapping[str, str], keys: Mapping[str, Any]) -> bool:
    return any(k in keys for k in (f"enc.blk.{captures['i']}.ffn_gate.weight",
                                   f"blk.{captures['i']}.ffn_gate.weight"))


#: transformers' module templates of a T5/UMT5 encoder; gguf-py says what llama.cpp calls each.
HF_TEMPLATES: tuple[str | tuple[str, Any], ...] = (
    "shared",
    f"{_ATTN}.SelfAttention.q", f"{_ATTN}.SelfAttention.k", f"{_ATTN}.SelfAttention.v",
    f"{_ATTN}.SelfAttention.o", f"{_ATTN}.SelfAttention.relative_attention_bias",
    f"{_ATTN}.layer_norm",
    f"{_FFN}.DenseReluDense.wi_0", (f"{_FFN}.DenseReluDense.wi_1", _gated),
    f"{_FFN}.DenseReluDense.wi", f"{_FFN}.DenseReluDense.wo", f"{_FFN}.layer_norm",
    "encoder.final_layer_norm",
)

RULES = llama_cpp_rules("t5encoder", HF_TEMPLATES)

# Wan's release ships its UMT5-XXL encoder in the names of its own T5 module
# (``models_t5_umt5-xxl-enc-bf16.pth``): a block is ``norm1``, ``attn.{q,k,v,o}``, ``norm2`` and a
# gated FFN whose ``gate.0`` carries the activation (transformers' ``wi_0``), ``fc1`` the linear
# branch (``wi_1``) and ``fc2`` the output (``wo``); each block has its own relative-position
# table (``pos_embedding.embedding``: UMT5).
WAN_RULES: tuple[Rule, ...] = (
    rename("token_embedding.*", "shared.*"),
    rename("blocks.{i}.norm1.*", f"{_ATTN}.layer_norm.*"),
    *(rename(f"blocks.{{i}}.attn.{n}.*", f"{_ATTN}.SelfAttention.{n}.*") for n in "qkvo"),
    rename("blocks.{i}.pos_embedding.embedding.*",
           f"{_ATTN}.SelfAttention.relative_attention_bias.*"),
    rename("blocks.{i}.norm2.*", f"{_FFN}.layer_norm.*"),
    rename("blocks.{i}.ffn.gate.0.*", f"{_FFN}.DenseReluDense.wi_0.*"),
    rename("blocks.{i}.ffn.fc1.*", f"{_FFN}.DenseReluDense.wi_1.*"),
    rename("blocks.{i}.ffn.fc2.*", f"{_FFN}.DenseReluDense.wo.*"),
    rename("norm.*", "encoder.final_layer_norm.*"),
)

#: Every released T5/UMT5's relative-attention maximum distance (in no file).
MAX_DISTANCE = 128


def infer_config(s: Shapes) -> dict[str, Any]:
    """transformers' ``T5Config`` / ``UMT5Config`` fields from the tensors' shapes."""
    # a checkpoint stores the tied embedding under either name (llama.cpp's converter notes both)
    embedding = "shared.weight" if s.has("shared.weight") or not s.has(
        "encoder.embed_tokens.weight") else "encoder.embed_tokens.weight"
    vocab, d_model = s.require(embedding, "the vocabulary and width", ndim=2)
    layers = s.count("encoder.block.{i}.*")
    q_rows = s.require(f"{_ATTN.format(i=0)}.SelfAttention.q.weight", "the attention width",
                       ndim=2)[0]
    buckets, heads = s.require(f"{_ATTN.format(i=0)}.SelfAttention.relative_attention_bias.weight",
                               "the heads and relative-attention buckets", ndim=2)
    gated = s.has(f"{_FFN.format(i=0)}.DenseReluDense.wi_0.weight")
    up = f"{_FFN.format(i=0)}.DenseReluDense.{'wi_1' if gated else 'wi'}.weight"
    d_ff = s.require(up, "the FFN width", ndim=2)[0]
    umt5 = layers > 1 and all(
        s.has(f"{_ATTN.format(i=i)}.SelfAttention.relative_attention_bias.weight")
        for i in range(layers))
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": q_rows // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": MAX_DISTANCE,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "layer_norm_epsilon": 1e-6,
        "architectures": ["UMT5EncoderModel" if umt5 else "T5EncoderModel"],
    }


def llama_cpp_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``t5encoder.*`` hyperparameters llama.cpp's converter writes (what llama.cpp and
    transformers' GGUF loader read the model's shape from), for a file in the llama.cpp layout."""
    from gguf import GGUFValueType

    from ..serialize import TypedValue

    def u32(v: Any) -> TypedValue:
        return TypedValue(GGUFValueType.UINT32, int(v))

    arch = "t5encoder"
    return {
        "general.architecture": arch,
        f"{arch}.context_length": u32(512),  # (every T5/UMT5 video encoder's; in no shape)
        # (readers take the vocabulary size from the token list; without one, from this key)
        f"{arch}.vocab_size": u32(config["vocab_size"]),
        f"{arch}.embedding_length": u32(config["d_model"]),
        f"{arch}.feed_forward_length": u32(config["d_ff"]),
        f"{arch}.block_count": u32(config["num_layers"]),
        f"{arch}.attention.head_count": u32(config["num_heads"]),
        f"{arch}.attention.key_length": u32(config["d_kv"]),
        f"{arch}.attention.value_length": u32(config["d_kv"]),
        f"{arch}.attention.layer_norm_epsilon": float(config["layer_norm_epsilon"]),
        f"{arch}.attention.relative_buckets_count":
            u32(config["relative_attention_num_buckets"]),
    }


def class_name(config: Mapping[str, Any]) -> str:
    return str(config["architectures"][0])


_SIZES = {(4096, 24): "XXL", (1024, 24): "large", (768, 12): "base", (512, 8): "small",
          (2048, 24): "XL"}


def variant(config: Mapping[str, Any], s: Shapes) -> str:
    kind = "UMT5" if config["architectures"][0].startswith("UMT5") else "T5"
    size = _SIZES.get((config["d_model"], config["num_layers"]))
    return (f"{kind}-{size} encoder" if size else
            f"{kind} encoder (d_model {config['d_model']}, {config['num_layers']} layers)")


FAMILY: Family[Any] = Family(
    name="t5-encoder",
    title="T5/UMT5 text encoder",
    kind="text-encoder",
    architectures=("t5encoder", "t5"),
    signatures={
        "diffusers": (("encoder.block.0.layer.0.SelfAttention.q.weight",
                       "encoder.final_layer_norm.weight"),),
        "llama.cpp": (("enc.blk.0.attn_q.weight", "enc.output_norm.weight"),),
        "wan": (("token_embedding.weight", "blocks.0.attn.q.weight",
                 "blocks.0.ffn.gate.0.weight"),),
    },
    rules={"llama.cpp": RULES, "wan": WAN_RULES},
    infer_config=infer_config,
    class_name=class_name,
    variant=variant,
    library="transformers",
    metadata_config={"attention.layer_norm_epsilon": "layer_norm_epsilon"},
    unused=("dec.*", "output.*", "decoder.*", "lm_head.*"),
    layout_metadata={"llama.cpp": llama_cpp_metadata},
)
