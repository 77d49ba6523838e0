"""Tokenizers from a GGUF file's ``tokenizer.ggml.*`` metadata, built by transformers."""

from __future__ import annotations

import gguf
import pytest

transformers = pytest.importorskip("transformers")
from text_encoder_files import (  # noqa: E402
    build_encoder,
    sentencepiece_vocabulary,
    train_sentencepiece,
    vocabulary,
    write_text_encoder,
)
from transformers import AutoTokenizer, T5Tokenizer  # noqa: E402

from ggufvideo import ModelLoadError, save_state_dict  # noqa: E402
from ggufvideo.tokenizer import has_tokenizer, tokenizer_from_gguf  # noqa: E402

TEXTS = ["a cat walks on the beach at sunset", "A dog, in rain at night!  blurry",
         "zzz qq", "", "low quality video of the city"]


@pytest.fixture(scope="module")
def te_file(tmp_path_factory):
    return write_text_encoder(tmp_path_factory.mktemp("te") / "te.gguf", build_encoder(True))


def test_t5_tokenizer_tokenizes_like_transformers_built_from_the_same_vocabulary(te_file):
    tok = tokenizer_from_gguf(te_file)
    tokens, scores, _ = vocabulary(96)
    same_vocab = T5Tokenizer(vocab=list(zip(tokens, scores)), extra_ids=0)
    from_file = AutoTokenizer.from_pretrained(str(te_file.rpartition("/")[0]),
                                              gguf_file="te.gguf")
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == same_vocab(text).input_ids == from_file(text).input_ids, text
        assert ids[-1] == 1  # </s> appended, as T5 does
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")


# Wan's default negative prompt is Chinese with full-width commas; the rest: full-width letters,
# circled digits and ligatures (NFKC), accents and emoji (byte pieces), spacing, newlines, tabs.
SPM_TEXTS = ["色调艳丽，过曝，静态，细节模糊不清", "ｃａｔ ＡＢＣ", "a cat 🐱 on the beach", "café",
             "  Hello   world.  ", "a\nb\tc", "", "①②③ ﬁ", "bright colors, static, overexposed",
             "一只猫在海滩上散步，低质量"]


@pytest.mark.parametrize("byte_fallback, umt5_ids", [(True, True), (False, False)])
def test_t5_vocabularies_encode_as_sentencepiece(tmp_path, byte_fallback, umt5_ids):
    """The reference is sentencepiece itself on the model the file's vocabulary came from."""
    model_file = train_sentencepiece(tmp_path / "spm", byte_fallback=byte_fallback,
                                     umt5_ids=umt5_ids)
    vocab = sentencepiece_vocabulary(model_file, size=448)
    path = write_text_encoder(tmp_path / "te.gguf", build_encoder(True, vocab=448), vocab=vocab)
    tok = tokenizer_from_gguf(path)
    sp = vocab["processor"]
    for text in SPM_TEXTS:
        assert tok(text).input_ids == sp.encode(text) + [vocab["eos"]], text
    # llama.cpp's unused "[PADn]" fillers are never produced from text that spells one
    assert tok("[PAD440] x").input_ids == sp.encode("[PAD440] x") + [vocab["eos"]]
    assert tok.unk_token_id == vocab["unk"] and tok.pad_token_id == vocab["pad"]
    assert tok.decode(tok("a cat on the beach").input_ids, skip_special_tokens=True) \
        == "a cat on the beach"
    if byte_fallback:
        assert tok.decode(tok("café 🐱").input_ids, skip_special_tokens=True) == "café 🐱"


def test_comfyuis_rebuilt_sentencepiece_model_encodes_the_same(tmp_path):
    """The ComfyUI text-encoder node hands ComfyUI a sentencepiece model rebuilt from the same
    metadata: both paths read it through one reader and tokenize alike."""
    import sentencepiece as spm

    from ggufvideo.comfy.loading import _spiece_model

    vocab = sentencepiece_vocabulary(train_sentencepiece(tmp_path / "spm"), size=448)
    path = write_text_encoder(tmp_path / "te.gguf", build_encoder(True, vocab=448), vocab=vocab)
    blob = _spiece_model(path)
    assert blob is not None
    rebuilt = spm.SentencePieceProcessor(model_proto=bytes(blob.numpy().tobytes()))
    tok = tokenizer_from_gguf(path)
    for text in SPM_TEXTS:
        assert rebuilt.encode(text) == vocab["processor"].encode(text), text
        assert tok(text).input_ids == rebuilt.encode(text) + [vocab["eos"]], text


@pytest.mark.parametrize("key, value, match", [
    ("unknown_token_id", 10_000, "unknown_token_id = 10000 is not a token id"),
    ("unknown_token_id", -1, "needs an unknown token id"),
    ("eos_token_id", 54, "eos_token_id = 54 is not a token id of the 54-token vocabulary"),
    ("scores", [0.0, 1.0], "54 tokens but 2 scores"),
    ("token_type", [1, 1, 1], "and 3 token types"),
    ("precompiled_charsmap", b"not a table", "precompiled_charsmap is not a normalization table"),
])
def test_a_broken_unigram_vocabulary_is_named(tmp_path, key, value, match):
    tokens, scores, types = vocabulary(40)
    assert len(tokens) == 54  # (the words and letters need 54)
    meta = {"scores": scores, "token_type": types, key: value}
    path = tmp_path / "broken.gguf"
    w = gguf.GGUFWriter(str(path), "t5encoder")
    w.add_tokenizer_model("t5")
    w.add_token_list(tokens)
    w.add_token_scores(meta["scores"])
    w.add_token_types(meta["token_type"])
    if key.endswith("_id"):
        w.add_int32(f"tokenizer.ggml.{key}", value)
    if key == "precompiled_charsmap":
        w.add_precompiled_charsmap(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=match):
        tokenizer_from_gguf(path)
    if key != "precompiled_charsmap":  # (sentencepiece itself judges the table there)
        from ggufvideo.comfy.loading import ComfyLoadError, _spiece_model

        with pytest.raises(ComfyLoadError, match=match):
            _spiece_model(str(path))


def test_padding_as_the_wan_pipeline_asks(te_file):
    tok = tokenizer_from_gguf(te_file)
    out = tok(["a cat"], padding="max_length", max_length=8, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    assert out.input_ids.tolist() == [[4, 5, 1, 0, 0, 0, 0, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]


def test_file_without_vocabulary_raises_clear_error(tmp_path):
    import torch

    path = tmp_path / "novocab.gguf"
    save_state_dict({"w": torch.zeros(4)}, path)
    assert not has_tokenizer(path)
    with pytest.raises(ModelLoadError, match="no tokenizer.*tokenizer.ggml.tokens"):
        tokenizer_from_gguf(path)


def test_unsupported_tokenizer_type_is_named(tmp_path):
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "t5encoder")
    tokens, scores, types = vocabulary(40)
    w.add_tokenizer_model("no-such-type")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="no-such-type"):
        tokenizer_from_gguf(path)
