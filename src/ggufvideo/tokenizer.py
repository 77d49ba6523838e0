"""The tokenizer a GGUF file describes (``tokenizer.ggml.*`` metadata).

llama.cpp's converter stores a model's vocabulary in the file: tokens, scores, token types,
merges, special ids, normalization rules. A ``t5`` vocabulary (sentencepiece unigram: T5, UMT5) is
built here from those pieces with the ``tokenizers`` library, because transformers' GGUF path for
it drops the normalization table and byte fallback (see :func:`_unigram`); ``llama`` and ``gpt2``
(byte-level BPE) vocabularies go to transformers' own builders. With it a GGUF text encoder needs
no hub download.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError, _safe

__all__ = ["tokenizer_from_gguf", "tokenizer_from_sentencepiece", "has_tokenizer",
           "UnigramVocab", "unigram_vocab"]

#: The metadata key every llama.cpp vocabulary has.
TOKENS_KEY = "tokenizer.ggml.tokens"
#: The vocabulary's type (``t5``: sentencepiece unigram; ``llama``; ``gpt2``: byte-level BPE).
MODEL_KEY = "tokenizer.ggml.model"
# How far below the lowest real piece's score the pieces text never turns into are put.
_NEVER_MARGIN = 1000.0


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a GGUF file carrying a vocabulary (``tokenizer.ggml.tokens``); a
    safetensors checkpoint never does."""
    from .reader import GGUFFile, is_gguf

    if not os.path.isfile(path) or not is_gguf(path):
        return False
    with GGUFFile(path) as f:
        return TOKENS_KEY in f.metadata


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
    from .reader import GGUFFile, is_gguf

    path = os.fspath(path)
    md: dict[str, Any] = {}
    if os.path.isfile(path) and is_gguf(path):
        with GGUFFile(path) as f:  # (its header read once, for the check and the vocabulary)
            md = dict(f.metadata)
    if TOKENS_KEY not in md:
        raise ModelLoadError(f"the file has no tokenizer (no {TOKENS_KEY!r} metadata); pass a "
                             "tokenizer folder instead", path=path)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise ImportError(f"{_safe(path, 300)}: building its tokenizer needs transformers: "
                          "pip install 'ggufvideo[text-encoders]'") from None
    if md.get(MODEL_KEY) == "t5":  # sentencepiece unigram: built here, as sentencepiece encodes
        backend, config = _unigram(md, path)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **kwargs})
    try:
        backend, config = _backend(path)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(f"transformers cannot build this file's tokenizer: {exc}",
                             path=path) from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **kwargs})


def tokenizer_from_sentencepiece(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A fast tokenizer from a sentencepiece unigram model file (T5's and UMT5's
    ``spiece.model``), built as :func:`tokenizer_from_gguf` builds a ``t5`` vocabulary: it
    encodes as sentencepiece does, ``</s>`` appended.

    Raises:
        ModelLoadError: not a sentencepiece model, or not a unigram one.
        ImportError: transformers, or sentencepiece's protobuf module, is not installed.
    """
    path = os.fspath(path)
    try:
        # (generated protobuf code: no type information, hence the Any)
        pb: Any = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
        from transformers import PreTrainedTokenizerFast
    except ImportError as exc:
        raise ImportError(f"{_safe(path, 300)}: reading a sentencepiece model needs transformers, "
                          f"sentencepiece and protobuf ({exc}): pip install "
                          "'ggufvideo[text-encoders]' protobuf") from None
    proto = pb.ModelProto()
    try:
        with open(path, "rb") as fh:
            proto.ParseFromString(fh.read())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelLoadError(f"not a sentencepiece model ({exc})", path=path) from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if not proto.pieces or spec.model_type != pb.TrainerSpec.UNIGRAM:
        raise ModelLoadError("not a sentencepiece unigram model (T5/UMT5's spiece.model is one)",
                             path=path)
    md = {TOKENS_KEY: [p.piece for p in proto.pieces],
          "tokenizer.ggml.scores": [p.score for p in proto.pieces],
          "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
          "tokenizer.ggml.unknown_token_id": spec.unk_id,
          "tokenizer.ggml.eos_token_id": spec.eos_id, "tokenizer.ggml.padding_token_id":
          spec.pad_id, "tokenizer.ggml.bos_token_id": spec.bos_id,
          "tokenizer.ggml.precompiled_charsmap": norm.precompiled_charsmap,
          "tokenizer.ggml.add_space_prefix": norm.add_dummy_prefix,
          "tokenizer.ggml.remove_extra_whitespaces": norm.remove_extra_whitespaces}
    backend, config = _unigram(md, path)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **kwargs})


def _special(md: Mapping[str, Any], key: str, default: int, n: int, path: str) -> int:
    value = md.get(f"tokenizer.ggml.{key}_token_id", default)
    if not isinstance(value, int) or not (value == -1 or 0 <= value < n):
        raise ModelLoadError(f"tokenizer.ggml.{key}_token_id = {value!r} is not a token id of the "
                             f"{n}-token vocabulary", path=path)
    return value


@dataclass(frozen=True)
class UnigramVocab:
    """A sentencepiece unigram vocabulary as llama.cpp stores it (``tokenizer.ggml.model = "t5"``).

    ``types`` use sentencepiece's numbering (1 normal, 2 unknown, 3 control, 4 user defined,
    5 unused, 6 byte); the special ids are -1 where absent (``unk`` never is).
    """

    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk: int
    eos: int
    pad: int
    bos: int
    charsmap: bytes
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    add_bos: bool
    add_eos: bool

    @property
    def byte_fallback(self) -> bool:
        """All 256 byte pieces (``<0xNN>``) are there: unknown characters become their bytes."""
        pieces = {t for t, k in zip(self.tokens, self.types) if k == 6}
        return all(f"<0x{b:02X}>" in pieces for b in range(256))


def unigram_vocab(md: Mapping[str, Any], path: str) -> UnigramVocab:
    """The file's unigram vocabulary, checked (scores/types per token, special ids in range).

    Raises:
        ModelLoadError: naming the metadata key that is wrong.
    """
    tokens = [str(t) for t in md[TOKENS_KEY]]
    n = len(tokens)
    scores = [float(x) for x in md.get("tokenizer.ggml.scores", [0.0] * n)]
    types = [int(x) for x in md.get("tokenizer.ggml.token_type", [1] * n)]
    if len(scores) != n or len(types) != n:
        raise ModelLoadError(f"the vocabulary has {n} tokens but {len(scores)} scores and "
                             f"{len(types)} token types", path=path)
    unk = _special(md, "unknown", 2, n, path)
    if unk < 0:
        raise ModelLoadError("a unigram vocabulary needs an unknown token id", path=path)
    bos = _special(md, "bos", -1, n, path)
    raw = md.get("tokenizer.ggml.precompiled_charsmap")
    return UnigramVocab(
        tokens, scores, types, unk, _special(md, "eos", 1, n, path),
        _special(md, "padding", 0, n, path), bos,
        bytes(bytearray(int(b) & 0xFF for b in raw)) if raw is not None else b"",
        bool(md.get("tokenizer.ggml.add_space_prefix", True)),
        bool(md.get("tokenizer.ggml.remove_extra_whitespaces", True)),
        bool(md.get("tokenizer.ggml.add_bos_token", False)) and bos >= 0,
        bool(md.get("tokenizer.ggml.add_eos_token", True)))


def _unigram(md: Mapping[str, Any], path: str) -> tuple[Any, dict[str, Any]]:
    """A ``tokenizers.Tokenizer`` that encodes as the sentencepiece unigram model the metadata
    describes (what llama.cpp writes for T5/UMT5: ``tokenizer.ggml.model = "t5"``).

    transformers' own GGUF path for this type drops the normalization table, byte fallback and
    the file's unknown id: full-width punctuation (every comma of Wan's Chinese negative prompt),
    full-width letters and characters outside the vocabulary came out as ``<unk>``. Here, as
    sentencepiece does: the ``precompiled_charsmap`` (NFKC-style rules) first, then extra spaces
    removed, a ``▁`` prefix and spaces as ``▁``, pieces that never cross a word start; unknown
    characters as their UTF-8 byte pieces where the vocabulary has all 256 (``<0xNN>``, type 6),
    else the file's unknown id; control and unused pieces (``<pad>``, llama.cpp's ``[PADn]``
    fillers) are never produced from text, as sentencepiece keeps them out of its lattice.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    v = unigram_vocab(md, path)
    # Control, unused and byte pieces stay out of sentencepiece's lattice (bytes come only by
    # fallback). The lattice here holds every piece, so they get a score far below any real
    # piece's -- but not so far that the unknown-character score (``tokenizers`` takes the
    # lowest score minus 10) falls below them: then text spelling "[PAD400]" or "<0x41>" would
    # still be cheaper as that piece than as its characters' unknowns.
    # Unused pieces (llama.cpp's "[PADn]" fillers) are also renamed out of reach: nothing needs
    # their text, and a prompt spelling one must not turn into it.
    real = [sc for sc, k in zip(v.scores, v.types) if k in (1, 4)] or [0.0]
    never = min(real) - _NEVER_MARGIN
    vocab = [("\x00unused\x00" + t if k == 5 else t, sc if k not in (3, 5, 6) else never)
             for t, sc, k in zip(v.tokens, v.scores, v.types)]
    tok = Tokenizer(Unigram(vocab, unk_id=v.unk, byte_fallback=v.byte_fallback))
    steps: list[Any] = []
    if v.charsmap:
        try:
            steps.append(normalizers.Precompiled(v.charsmap))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception here
            raise ModelLoadError(f"tokenizer.ggml.precompiled_charsmap is not a normalization "
                                 f"table ({exc})", path=path) from None
    if v.remove_extra_whitespaces:
        # only spaces: sentencepiece leaves other whitespace (left by the charsmap) as it is
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if v.add_space_prefix else "never", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if v.add_space_prefix else []))
    marks = [v.tokens[v.bos]] if v.add_bos else []
    ends = [v.tokens[v.eos]] if v.add_eos and v.eos >= 0 else []
    special = sorted({(v.tokens[i], i) for i in ([v.bos] if marks else []) + ([v.eos] if ends
                                                                                else [])})
    tok.post_processor = processors.TemplateProcessing(
        single=[*marks, "$A", *ends], pair=[*marks, "$A", *ends, "$B", *ends],
        special_tokens=special)
    config: dict[str, Any] = {"unk_token": v.tokens[v.unk]}
    for name, i in (("eos_token", v.eos), ("pad_token", v.pad), ("bos_token", v.bos)):
        if i >= 0:
            config[name] = v.tokens[i]
    return tok, config


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
