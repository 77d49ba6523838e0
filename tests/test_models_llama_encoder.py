"""Llama text encoders (HunyuanVideo's) from llama.cpp GGUFs: q/k rows un-permuted exactly, weights
kept quantized, output equal to transformers' own GGUF loader."""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as T

transformers = pytest.importorskip("transformers")
from llama_files import VOCAB, build_llama, llama_cpp_permute, llama_cpp_state_dict, write_llama  # noqa: E402
from transformers import LlamaModel  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGMLTensor, ModelLoadError, empty_weights, load_model, save_state_dict  # noqa: E402
from ggufvideo.building import describe_file  # noqa: E402
from ggufvideo.errors import UnknownModelError  # noqa: E402
from ggufvideo.loader import read_tensors  # noqa: E402
from ggufvideo.lora.targets import SegmentOps  # noqa: E402
from ggufvideo.model import assign_state_dict, parameter_bytes  # noqa: E402
from ggufvideo.models import CANONICAL, ShapeOps, describe, get_family  # noqa: E402
from ggufvideo.models.llama_encoder import rope_order  # noqa: E402
from ggufvideo.models.tensors import TensorOps, permute_rows  # noqa: E402
from ggufvideo.ops import QuantEmbedding  # noqa: E402
from ggufvideo.reader import GGUFFile  # noqa: E402

FAMILY = get_family("llama-text-encoder")
IDS = torch.tensor([[256, 116, 263, 258, 265, 261, 5, 7], [256, 40, 41, 42, 43, 267, 267, 267]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])


def reference(path: str) -> torch.nn.Module:
    """transformers' own GGUF loader (decodes every weight to float32, un-permutes q/k)."""
    return LlamaModel.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)
                                      ).eval()


def encode(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).last_hidden_state


@pytest.mark.parametrize("qtype", [T.Q8_0, T.F16, T.F32])
def test_from_gguf_matches_transformers_loader_and_keeps_weights_quantized(tmp_path, qtype):
    path = write_llama(tmp_path / "llama.gguf", build_llama(), qtype)
    model = ggufvideo.from_gguf(path)
    assert type(model) is LlamaModel
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert isinstance(model.embed_tokens, QuantEmbedding)
    if qtype != T.F32:  # F32 tensors are plain tensors (nothing to decode)
        assert isinstance(model.embed_tokens.weight, GGMLTensor)
        assert model.embed_tokens.weight.qtype == qtype
        k = model.layers[1].self_attn.k_proj.weight
        assert isinstance(k, GGMLTensor) and k.qtype == qtype
    assert parameter_bytes(model) <= 1.1 * os.path.getsize(path)
    assert torch.equal(encode(model), encode(reference(path)))


def test_f32_file_gives_the_original_model_exactly():
    """The inverse of llama.cpp's permutation is exact: an F32 file is the model it was made from."""
    model = build_llama(layers=1, hidden=96, heads=6, kv_heads=3)
    ours = FAMILY.convert(llama_cpp_state_dict(model), "llama.cpp", CANONICAL, TensorOps(),
                          {"general.architecture": "llama", "llama.attention.head_count": 6,
                           "llama.attention.head_count_kv": 3})
    want = model.state_dict()
    assert set(ours) == set(want)
    for k, v in want.items():
        assert torch.equal(ours[k], v), k


def test_file_with_lm_head_builds_the_encoder(tmp_path):
    model = build_llama()
    path = write_llama(tmp_path / "causal.gguf", model, lm_head=True)
    built = ggufvideo.from_gguf(path)  # output.weight (the LM head) left out
    assert type(built) is LlamaModel
    assert torch.equal(encode(built), encode(reference(path)))


def test_load_model_maps_llama_cpp_names_into_a_transformers_encoder(tmp_path):
    model = build_llama()
    path = write_llama(tmp_path / "llama.gguf", model)
    with empty_weights():
        target = LlamaModel(model.config)
    load_model(target, path).eval()
    q = target.layers[0].self_attn.q_proj.weight
    assert isinstance(q, GGMLTensor) and q.qtype == T.Q8_0
    assert isinstance(target.embed_tokens.weight, GGMLTensor)
    assert torch.equal(encode(target), encode(reference(path)))
    file = GGUFFile(path)
    with empty_weights():
        again = LlamaModel(model.config)
    report = assign_state_dict(again, read_tensors(file, lazy=True), metadata=file.metadata,
                               architecture="llama")
    assert report.layout.renamed and report.layout.source == "llama.cpp"


def test_permutation_round_trip_is_exact_on_raw_blocks(tmp_path):
    path = write_llama(tmp_path / "llama.gguf", build_llama())
    file = GGUFFile(path)
    sd = read_tensors(file, lazy=True)
    hf = FAMILY.convert(sd, "llama.cpp", CANONICAL, TensorOps(), file.metadata)
    for i in range(2):
        for name, heads in (("q", 4), ("k", 2)):
            src = sd[f"blk.{i}.attn_{name}.weight"]
            ours = hf[f"layers.{i}.self_attn.{name}_proj.weight"]
            assert isinstance(ours, GGMLTensor) and ours.qtype == T.Q8_0
            # rows of raw blocks gathered: decoded, it is the file's decoded rows un-permuted
            rows = src.dequantize(torch.float32)
            assert torch.equal(llama_cpp_permute(ours.dequantize(torch.float32), heads), rows)
    back = FAMILY.convert(hf, CANONICAL, "llama.cpp", TensorOps(), file.metadata)
    assert set(back) == set(sd)
    for k, v in sd.items():
        b = back[k]
        if isinstance(v, GGMLTensor):
            assert isinstance(b, GGMLTensor) and b.qtype == v.qtype
            assert torch.equal(b.raw, v.raw), k
        else:
            assert torch.equal(b, v), k


def test_rope_order_is_the_inverse_of_llama_cpps_permute():
    for rows, heads in ((64, 4), (32, 2), (96, 6)):
        x = torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3)
        assert torch.equal(permute_rows(llama_cpp_permute(x, heads), rope_order(rows, heads)), x)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_rows(torch.zeros(4, 2), [0, 0, 1, 2])
    # LoRA targets: row segments follow the same order
    segs = SegmentOps().permute_rows([("w", 0, 8)], lambda: rope_order(8, 2))
    assert segs == [("w", 0, 1), ("w", 2, 3), ("w", 1, 2), ("w", 3, 5),  # 3, 4 run together
                    ("w", 6, 7), ("w", 5, 6), ("w", 7, 8)]


def test_convert_between_layouts_permutes_and_back(tmp_path):
    path = write_llama(tmp_path / "llama.gguf", build_llama())
    hf = tmp_path / "hf.gguf"
    ggufvideo.convert(path, hf, qtype=None, layout=CANONICAL)
    assert "layers.0.self_attn.q_proj.weight" in GGUFFile(hf).tensors
    assert torch.equal(encode(ggufvideo.from_gguf(hf)), encode(ggufvideo.from_gguf(path)))
    back = tmp_path / "back.gguf"
    ggufvideo.convert(hf, back, qtype=None, layout="llama.cpp")
    a, b = read_tensors(GGUFFile(path), lazy=True), read_tensors(GGUFFile(back), lazy=True)
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.equal(getattr(b[k], "raw", b[k]), getattr(v, "raw", v)), k


def test_config_from_shapes_and_metadata(tmp_path):
    model = build_llama(layers=3, hidden=128, heads=8, kv_heads=2, ffn=160)
    path = write_llama(tmp_path / "llama.gguf", model)
    desc = describe_file(path)
    assert desc.detection.family is FAMILY and desc.detection.layout == "llama.cpp"
    assert desc.class_name == "LlamaModel"
    cfg = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert desc.config[key] == getattr(cfg, key), key
    # float32 in the file, as llama.cpp writes them
    assert desc.config["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert desc.config["rope_theta"] == pytest.approx(cfg.rope_parameters["rope_theta"])
    # names and shapes alone (no metadata) describe it too: the row order is not needed
    shapes = {k: tuple(v.shape) for k, v in llama_cpp_state_dict(model).items()}
    assert describe(shapes, "llama").config["vocab_size"] == VOCAB
    assert set(FAMILY.convert(shapes, "llama.cpp", CANONICAL, ShapeOps())) == \
        set(model.state_dict())


def test_missing_tensor_is_named(tmp_path):
    path = write_llama(tmp_path / "bad.gguf", build_llama(), skip=("blk.1.attn_k.weight",))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.k_proj\.weight"):
        ggufvideo.from_gguf(path)


def test_missing_head_count_is_named(tmp_path):
    model = build_llama()
    path = tmp_path / "noheads.gguf"
    save_state_dict(llama_cpp_state_dict(model), path, qtype="Q8_0",
                    metadata={"general.architecture": "llama"})
    with pytest.raises(ModelLoadError, match="llama.attention.head_count"):
        ggufvideo.from_gguf(path)


def test_other_llama_cpp_architecture_is_refused(tmp_path):
    path = tmp_path / "qwen.gguf"
    save_state_dict(llama_cpp_state_dict(build_llama()), path, qtype="Q8_0",
                    metadata={"general.architecture": "qwen2", "qwen2.attention.head_count": 4})
    with pytest.raises(ModelLoadError, match="qwen2"):
        ggufvideo.from_gguf(path)


def test_tokenizer_from_a_gpt2_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    path = write_llama(tmp_path / "llama.gguf", build_llama())
    tok = ggufvideo.tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="llama.gguf")
    text = "the cat a dog at the beach"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert tok.convert_ids_to_tokens(tok("the cat")["input_ids"]) == \
        ["<|begin_of_text|>", "t", "he", "Ġcat"]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("arch", ["qwen2vl", "gemma3", "mistral"])
def test_other_architectures_are_not_described_as_llama(arch):
    shapes = {k: tuple(v.shape) for k, v in llama_cpp_state_dict(build_llama()).items()}
    with pytest.raises(UnknownModelError, match=f"architecture '{arch}'.*not a model ggufvideo "
                                                "builds.*llama.*t5encoder"):
        describe(shapes, arch)


def test_a_causal_lm_checkpoint_with_its_prefix_and_head_builds_the_encoder(tmp_path):
    model = build_llama()
    sd = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = torch.randn(model.config.vocab_size, model.config.hidden_size)
    path = tmp_path / "causal.gguf"
    save_state_dict(sd, path, qtype="Q8_0", metadata={
        "general.architecture": "llama", "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2})
    built = ggufvideo.from_gguf(path)
    assert type(built).__name__ == "LlamaModel"
