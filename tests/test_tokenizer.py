"""Tokenizers from a GGUF file's ``tokenizer.ggml.*`` metadata, built by transformers."""

from __future__ import annotations

import gguf
import pytest

transformers = pytest.importorskip("transformers")
from text_encoder_files import build_encoder, vocabulary, write_text_encoder  # noqa: E402
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
