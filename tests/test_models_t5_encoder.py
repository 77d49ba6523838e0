"""T5/UMT5 text encoders from llama.cpp-named GGUFs: kept quantized, equal to transformers' loader."""

from __future__ import annotations

import os

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as T

transformers = pytest.importorskip("transformers")
from text_encoder_files import build_encoder, llama_cpp_state_dict, write_text_encoder  # noqa: E402
from transformers import T5EncoderModel, UMT5EncoderModel  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGMLTensor, ModelLoadError, empty_weights, load_model, save_state_dict  # noqa: E402
from ggufvideo.building import describe_file  # noqa: E402
from ggufvideo.model import parameter_bytes  # noqa: E402
from ggufvideo.models import CANONICAL, ShapeOps, describe, get_family  # noqa: E402
from ggufvideo.ops import QuantEmbedding  # noqa: E402
from ggufvideo.reader import GGUFFile  # noqa: E402

FAMILY = get_family("t5-encoder")
IDS = torch.tensor([[4, 5, 7, 8, 9, 10, 1, 0], [11, 12, 13, 1, 0, 0, 0, 0]])
MASK = (IDS != 0) | (torch.arange(8) == 6)


def reference(path: str, cls: type, config=None) -> torch.nn.Module:
    """transformers' own GGUF loader (decodes every weight to float32).

    For T5 its config reader sets a gated FFN with T5's default ``relu`` (its "only flan-t5"
    FIXME); T5 v1.1/FLAN-T5 and the video models' T5-XXL use ``gelu_new``, as our config says:
    the T5 comparison passes our config so that the same weights meet the same math.
    """
    kwargs = {"config": config} if config is not None else {}
    return cls.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                               **kwargs).eval()


def encode(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK.long()).last_hidden_state


@pytest.mark.parametrize("umt5,qtype", [(True, T.Q8_0), (False, T.Q8_0), (True, T.Q4_K)])
def test_from_gguf_keeps_weights_quantized_and_matches_transformers_loader(tmp_path, umt5, qtype):
    cls = UMT5EncoderModel if umt5 else T5EncoderModel
    path = write_text_encoder(tmp_path / "te.gguf", build_encoder(umt5, d_model=256, d_ff=512),
                              qtype)
    model = ggufvideo.from_gguf(path)
    assert type(model) is cls
    assert isinstance(model.shared, QuantEmbedding) and isinstance(model.shared.weight, GGMLTensor)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    q = model.encoder.block[1].layer[0].SelfAttention.q.weight
    assert isinstance(q, GGMLTensor) and q.qtype == qtype
    assert parameter_bytes(model) <= 1.1 * os.path.getsize(path)
    ref = reference(path, cls, None if umt5 else model.config)
    assert torch.equal(encode(model), encode(ref))


def test_relative_attention_bias_in_every_block_tells_umt5_from_t5(tmp_path):
    for umt5, name in ((True, "UMT5EncoderModel"), (False, "T5EncoderModel")):
        path = write_text_encoder(tmp_path / f"{name}.gguf", build_encoder(umt5), name="x")
        desc = describe_file(path)
        assert desc.class_name == name and desc.detection.layout == "llama.cpp"
        assert desc.variant.startswith(name[:-12])


@pytest.mark.parametrize("umt5,gated", [(True, True), (False, True), (False, False)])
def test_config_inferred_from_llama_cpp_names(umt5, gated):
    model = build_encoder(umt5, gated=gated, layers=3)
    shapes = {k: tuple(v.shape) for k, v in llama_cpp_state_dict(model).items()}
    desc = describe(shapes, "t5encoder")
    assert desc.detection.family is FAMILY
    cfg = model.config
    for key, value in desc.config.items():
        if key != "architectures":
            assert value == getattr(cfg, key), key
    assert desc.config["architectures"] == [type(model).__name__]
    rebuilt = type(model)(type(cfg)(**desc.config))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_llama_cpp_names_are_gguf_pys_both_ways():
    model = build_encoder(True, layers=3)
    theirs = llama_cpp_state_dict(model)  # named by gguf-py's map, as llama.cpp's converter does
    shapes = {k: tuple(v.shape) for k, v in theirs.items()}
    ours = FAMILY.convert(shapes, "llama.cpp", CANONICAL, ShapeOps())
    want = {k for k in model.state_dict() if k != "encoder.embed_tokens.weight"}
    assert set(ours) == want
    back = FAMILY.convert(ours, CANONICAL, "llama.cpp", ShapeOps())
    assert set(back) == set(theirs)


def test_ungated_t5_loads_with_relu_ffn(tmp_path):
    model = build_encoder(False, gated=False)
    path = write_text_encoder(tmp_path / "t5.gguf", model, T.F16 if False else T.Q8_0)
    ours = ggufvideo.from_gguf(path)
    assert ours.config.feed_forward_proj == "relu"
    with empty_weights():
        plain = T5EncoderModel(model.config)
    load_model(plain, path, lazy=False).eval()  # decoded weights, the layers left as they are
    assert torch.equal(encode(ours), encode(plain))


def test_load_model_maps_llama_cpp_names_into_a_transformers_encoder(tmp_path):
    model = build_encoder(True)
    path = write_text_encoder(tmp_path / "te.gguf", model)
    with empty_weights():
        target = UMT5EncoderModel(model.config)
    load_model(target, path).eval()
    assert isinstance(target.encoder.block[0].layer[1].DenseReluDense.wo.weight, GGMLTensor)
    assert torch.equal(encode(target), encode(reference(path, UMT5EncoderModel)))


def test_hf_checkpoint_without_the_tied_embedding_loads_strictly(tmp_path):
    model = build_encoder(True)
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    path = tmp_path / "hf.gguf"
    save_state_dict(sd, path, qtype="Q8_0")
    with empty_weights():
        target = UMT5EncoderModel(model.config)
    load_model(target, path, strict=True).eval()  # no "missing encoder.embed_tokens.weight"
    assert target.shared.weight is target.encoder.embed_tokens.weight
    assert isinstance(target.shared.weight, GGMLTensor)
    built = ggufvideo.from_gguf(path)  # transformers' names are the canonical layout
    assert type(built) is UMT5EncoderModel
    assert torch.equal(encode(built), encode(target))


def test_encoder_decoder_file_loads_its_encoder(tmp_path):
    model = build_encoder(True)
    path = tmp_path / "t5.gguf"
    sd = {k: v.contiguous() for k, v in llama_cpp_state_dict(model).items()}
    sd["dec.blk.0.attn_q.weight"] = torch.randn(64, 64)
    sd["output.weight"] = torch.randn(96, 64)
    save_state_dict(sd, path, qtype="Q8_0", metadata={"general.architecture": "t5"})
    built = ggufvideo.from_gguf(path)
    assert type(built) is UMT5EncoderModel
    with empty_weights():
        target = UMT5EncoderModel(model.config)
    # the decoder and LM head are parts of the file the encoder has no place for (transformers'
    # T5EncoderModel ignores a checkpoint's decoder the same way); strict about anything else
    load_model(target, path).eval()
    assert torch.equal(encode(target), encode(built))
    sd["enc.blk.0.attn_extra.weight"] = torch.randn(64, 64)
    save_state_dict(sd, path, qtype="Q8_0", metadata={"general.architecture": "t5"},
                    overwrite=True)
    with empty_weights():
        target = UMT5EncoderModel(model.config)
    with pytest.raises(ModelLoadError, match="enc.blk.0.attn_extra.weight"):
        load_model(target, path)


def test_missing_bias_table_is_named(tmp_path):
    model = build_encoder(True)
    sd = {k: v.contiguous() for k, v in llama_cpp_state_dict(model).items()
          if k != "enc.blk.0.attn_rel_b.weight"}
    path = tmp_path / "bad.gguf"
    save_state_dict(sd, path, metadata={"general.architecture": "t5encoder"})
    with pytest.raises(ModelLoadError, match="relative_attention_bias"):
        ggufvideo.from_gguf(path)


def test_gguf_py_table_drift_is_reported():
    from ggufvideo.models.gguf_names import llama_cpp_rules

    with pytest.raises(KeyError, match="no name for 'encoder.block.{i}.nonsense'"):
        llama_cpp_rules("t5encoder", ["encoder.block.{i}.nonsense"])
    assert gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.T5ENCODER] == "t5encoder"


@pytest.mark.parametrize("prefix", ["", "text_encoders.t5xxl.transformer."])
def test_hf_names_with_the_embedding_only_as_embed_tokens(tmp_path, prefix):
    """Checkpoints store the tied embedding under either name; ComfyUI's all-in-one files nest
    the encoder under a prefix of their own."""
    model = build_encoder(True)
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items()
          if k != "shared.weight"}
    path = tmp_path / "embed_tokens.gguf"
    save_state_dict(sd, path)  # float32 as given: the output is the model's own
    built = ggufvideo.from_gguf(path).eval()
    assert type(built) is UMT5EncoderModel
    assert torch.equal(encode(built), encode(model))


def _wan_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder in the names of Wan's own T5 module (the release's .pth), written out here
    from Wan's module layout: norm1/attn/norm2, a gated FFN (gate.0, fc1, fc2), per-block
    relative-position tables, token_embedding and norm."""
    sd = model.state_dict()
    out = {"token_embedding.weight": sd["shared.weight"],
           "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(model.config.num_layers):
        a, f = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
        out[f"blocks.{i}.norm1.weight"] = sd[f"{a}.layer_norm.weight"]
        for n in "qkvo":
            out[f"blocks.{i}.attn.{n}.weight"] = sd[f"{a}.SelfAttention.{n}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = \
            sd[f"{a}.SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm2.weight"] = sd[f"{f}.layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = sd[f"{f}.DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = sd[f"{f}.DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = sd[f"{f}.DenseReluDense.wo.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".gguf"])
def test_wans_own_encoder_names_build_the_encoder(tmp_path, suffix):
    model = build_encoder(True)
    path = tmp_path / f"models_t5_umt5-xxl-enc{suffix}"
    sd = _wan_names(model)
    if suffix == ".pth":
        torch.save(sd, path)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        save_state_dict(sd, path)  # float32 as given
    built = ggufvideo.from_gguf(path).eval()
    assert type(built) is UMT5EncoderModel
    assert torch.equal(encode(built), encode(model))
    with empty_weights():
        target = UMT5EncoderModel(model.config)
    if suffix == ".gguf":  # load_model maps the layout onto transformers' names too
        load_model(target, path).eval()
        assert torch.equal(encode(target), encode(model))


def test_convert_to_the_llama_cpp_layout_writes_its_hyperparameters(tmp_path):
    """A file in llama.cpp's names carries llama.cpp's t5encoder.* keys, which llama.cpp and
    transformers' GGUF loader read the model's shape from: transformers' loader (the reference)
    builds the same encoder from it."""
    from safetensors.torch import save_file

    model = build_encoder(True)
    src = tmp_path / "umt5.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, src)
    ggufvideo.convert(src, tmp_path / "umt5-llama.cpp.gguf", qtype="F32", layout="llama.cpp")
    with GGUFFile(tmp_path / "umt5-llama.cpp.gguf") as g:
        assert g.metadata["general.architecture"] == "t5encoder"
        assert g.metadata["t5encoder.block_count"] == 2
        assert g.metadata["t5encoder.attention.relative_buckets_count"] == 32
    theirs = UMT5EncoderModel.from_pretrained(str(tmp_path), gguf_file="umt5-llama.cpp.gguf")
    assert torch.equal(encode(theirs.eval()), encode(model))
