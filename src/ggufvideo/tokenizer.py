"""The tokenizer a GGUF file describes (``tokenizer.ggml.*`` metadata), built by transformers.

llama.cpp's converter stores a model's vocabulary in the file: tokens, scores, token types,
merges, special ids. transformers can rebuild a fast tokenizer from them for the types it covers
(``t5`` unigram, ``llama`` sentencepiece, ``gpt2`` byte-level BPE); this module only reads the
file and hands the pieces to transformers' own builders -- it writes no tokenizer. With it a GGUF
text encoder needs no hub download.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ModelLoadError, _safe

__all__ = ["tokenizer_from_gguf", "has_tokenizer"]

#: The metadata key every llama.cpp vocabulary has.
TOKENS_KEY = "tokenizer.ggml.tokens"


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a GGUF file carrying a vocabulary (``tokenizer.ggml.tokens``); a
    safetensors checkpoint never does."""
    from .reader import GGUFFile, is_gguf

    return is_gguf(path) and TOKENS_KEY in GGUFFile(path).metadata


def tokenizer_from_gguf(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A transformers fast tokenizer built from the file's ``tokenizer.ggml.*`` metadata.

    Args:
        path: a GGUF file made by llama.cpp's converter (or ggufvideo's text-encoder writer).
        kwargs: passed to the tokenizer's constructor (``model_max_length=512``...).

    Returns:
        A ``PreTrainedTokenizerFast`` (transformers 5: ``TokenizersBackend``) whose special tokens
        and add-BOS/EOS behaviour are the file's.

    Raises:
        ModelLoadError: the file has no vocabulary, or one of a type transformers cannot build
            (the message names the type).
        ImportError: transformers is not installed.
    """
    path = os.fspath(path)
    if not has_tokenizer(path):
        raise ModelLoadError(f"the file has no tokenizer (no {TOKENS_KEY!r} metadata); pass a "
                             "tokenizer folder instead", path=path)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise ImportError(f"{_safe(path, 300)}: building its tokenizer needs transformers: "
                          "pip install 'ggufvideo[text-encoders]'") from None
    try:
        backend, config = _backend(path)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(f"transformers cannot build this file's tokenizer: {exc}",
                             path=path) from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **kwargs})


def _backend(path: str) -> tuple[Any, dict[str, Any]]:
    """(``tokenizers.Tokenizer``, tokenizer config) by transformers' GGUF tokenizer support."""
    try:  # transformers >= 5.x: integrations.gguf
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x: integrations.ggml
        # (the type stubs are those of the installed transformers 5.x, which moved it to .gguf)
        from transformers.integrations.ggml import (  # type: ignore[attr-defined]
            convert_gguf_tokenizer as convert_v4,
        )
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = load_gguf_checkpoint(path, return_tensors=False)
        tok = parsed["tokenizer"]
        backend, extra = convert_v4(parsed["config"]["model_type"], tok)
        config = dict(parsed.get("tokenizer_config", {}))
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
            if tok.get(key) is not None:
                config.setdefault(name, tok["tokens"][tok[key]])
        return backend, {**config, **extra}
    architecture, tokenizer_dict, config = get_gguf_tokenizer(path)
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend, {k: v for k, v in {**config, **extra}.items() if v is not None}
