"""Scaled checkpoints (fp8/int8 values with a scale tensor beside them) convert to their true values.

The reference is the definition every loader of these formats uses: ``value.float() * scale``,
the scale broadcast over its tensor / rows / blocks.
"""

from __future__ import annotations

import json

import pytest
import torch

from ggufvideo import load_model, load_state_dict
from ggufvideo.convert import SOURCE_METADATA_PREFIX, convert, open_source
from ggufvideo.demo import TinyVideoDiT
from ggufvideo.errors import GGUFError
from ggufvideo.reader import GGUFFile

save_file = pytest.importorskip("safetensors.torch").save_file
E4M3 = torch.float8_e4m3fn


def _fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-448, 448).to(E4M3)


def _blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """A block scale grid expanded to the weight's shape (the test's own reference expansion)."""
    out = torch.empty(shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = scale[i, j]
    return out


def _convert_f32(tmp_path, sd, metadata=None):
    src = tmp_path / "scaled.safetensors"
    save_file(sd, src, metadata=metadata)
    dst = tmp_path / "out.gguf"
    summary = convert(src, dst, qtype=None)
    return load_state_dict(dst), summary, dst


def test_comfyui_scaled_fp8_weights_are_multiplied_by_their_scale(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(64, 32) * 0.02
    s = w.abs().max() / 448
    q = _fp8(w, s)
    sd = {"blocks.0.ffn.0.weight": q, "blocks.0.ffn.0.scale_weight": s.reshape(1),
          "blocks.0.ffn.0.scale_input": torch.ones(1), "blocks.0.ffn.0.bias": torch.randn(64),
          "blocks.0.ffn.2.weight": q.clone(), "blocks.0.ffn.2.scale_weight": s.reshape(()).clone(),
          "scaled_fp8": torch.zeros(2, dtype=E4M3)}
    out, summary, _ = _convert_f32(tmp_path, sd)
    assert set(out) == {"blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "blocks.0.ffn.2.weight"}
    ref = q.float() * s
    assert out["blocks.0.ffn.0.weight"].dtype == torch.float32
    assert torch.equal(out["blocks.0.ffn.0.weight"], ref)  # one float32 rounding, as defined
    assert torch.equal(out["blocks.0.ffn.2.weight"], ref)
    assert torch.allclose(ref, w, rtol=0.07, atol=1e-4)  # the true weights, not 448-sized values
    assert any("2 scaled weight(s)" in n for n in summary.notes)


def test_legacy_scale_applies_to_a_float_weight_too(tmp_path):
    # ComfyUI multiplies scale_weight into whatever weight carries one.
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    sd = {"a.weight": w, "a.scale_weight": torch.tensor([0.5]), "scaled_fp8": torch.zeros(0)}
    out, _, _ = _convert_f32(tmp_path, sd)
    assert set(out) == {"a.weight"} and torch.equal(out["a.weight"], w.float() * 0.5)


@pytest.mark.parametrize("shape, grid", [
    ((256, 384), (2, 3)),      # whole 128x128 blocks
    ((300, 200), (3, 2)),      # ragged edge blocks: 128 x 128, the last ones cut short
    ((48, 20), (48, 1)),       # per row as (N, 1)
    ((48, 20), (48,)),         # per row as (N,)
])
def test_block_and_row_scales(tmp_path, shape, grid):
    torch.manual_seed(1)
    q = (torch.randn(shape) * 50).clamp(-448, 448).to(E4M3)
    scale = torch.rand(grid) + 0.1
    sd = {"x.weight": q, "x.weight_scale_inv": scale}
    out, _, _ = _convert_f32(tmp_path, sd)
    g2 = scale.reshape(grid[0], -1)
    block = tuple(128 if -(-d // 128) == g else d // g for d, g in zip(shape, g2.shape))
    assert torch.equal(out["x.weight"], q.float() * _blocks(g2, shape, block))


def test_comfy_quant_records_and_uint8_fp8_containers(tmp_path):
    torch.manual_seed(2)
    q = (torch.randn(32, 64) * 100).clamp(-448, 448).to(E4M3)
    record = json.dumps({"format": "float8_e4m3fn"}).encode()
    sd = {
        "m.a.weight": q, "m.a.weight_scale": torch.tensor(0.01), "m.a.input_scale": torch.tensor(1.),
        "m.a.comfy_quant": torch.tensor(list(record), dtype=torch.uint8),
        # fp8 bytes kept in a uint8 container; the header's record declares the format
        "m.b.weight": q.view(torch.uint8).clone(), "m.b.weight_scale": torch.tensor(0.02),
        "m.c.weight": torch.randn(4, 4),  # a layer left in high precision
    }
    meta = {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {"m.a": {"format": "float8_e4m3fn"},
                                             "m.b": {"format": "float8_e4m3fn"}}})}
    out, _, dst = _convert_f32(tmp_path, sd, meta)
    assert set(out) == {"m.a.weight", "m.b.weight", "m.c.weight"}
    assert torch.equal(out["m.a.weight"], q.float() * torch.tensor(0.01))
    assert torch.equal(out["m.b.weight"], q.float() * torch.tensor(0.02))
    with GGUFFile(dst) as g:  # the record described the source, not the GGUF
        assert SOURCE_METADATA_PREFIX + "_quantization_metadata" not in g.metadata


def test_int8_weights_with_row_scales(tmp_path):
    q = torch.randint(-127, 128, (16, 8), dtype=torch.int8)
    s = torch.rand(16, 1) / 127
    out, _, _ = _convert_f32(tmp_path, {"l.weight": q, "l.weight_scale": s})
    assert torch.equal(out["l.weight"], q.float() * s)


def test_a_declared_group_size_reads_ragged_blocks(tmp_path):
    q = torch.randint(-127, 128, (100, 130), dtype=torch.int8)
    scale = torch.rand(2, 3) / 127
    record = {"format_version": "1.0",
              "layers": {"l": {"format": "int8_blockwise", "group_size": 64}}}
    out, _, _ = _convert_f32(tmp_path, {"l.weight": q, "l.weight_scale": scale},
                             {"_quantization_metadata": json.dumps(record)})
    assert torch.equal(out["l.weight"], q.float() * _blocks(scale, (100, 130), (64, 64)))


def test_a_marker_under_a_prefix_and_an_empty_weight(tmp_path):
    # all-in-one files carry ComfyUI's marker under the part's prefix
    q = (torch.randn(8, 8) * 10).to(E4M3)
    sd = {"text_encoders.t5xxl.transformer.scaled_fp8": torch.zeros(2, dtype=E4M3),
          "text_encoders.t5xxl.transformer.a.weight": q,
          "text_encoders.t5xxl.transformer.a.scale_weight": torch.tensor([0.5]),
          "e.weight": torch.zeros(0, 16).to(E4M3), "e.weight_scale": torch.tensor(2.0)}
    out, _, _ = _convert_f32(tmp_path, sd)
    assert set(out) == {"text_encoders.t5xxl.transformer.a.weight", "e.weight"}
    assert out["e.weight"].shape == (0, 16)


def test_unmarked_scale_weight_beside_a_float_weight_is_left_alone(tmp_path):
    # ComfyUI multiplies scale_weight into a float weight only in a file it marked scaled_fp8
    sd = {"l.weight": torch.randn(4, 4), "l.scale_weight": torch.tensor([2.0]),
          "norm.weight_scale": torch.rand(4)}  # and a model's own *.weight_scale parameter
    out, summary, _ = _convert_f32(tmp_path, sd)
    assert set(out) == set(sd) and torch.equal(out["l.weight"], sd["l.weight"])
    assert not summary.notes or not any("scaled" in n for n in summary.notes)


def test_a_float_weight_beside_a_weight_scale_is_left_alone(tmp_path):
    # Without a quantized dtype or a format record, "weight_scale" may be the model's own parameter.
    sd = {"n.weight": torch.randn(4, 4), "n.weight_scale": torch.rand(4)}
    out, summary, _ = _convert_f32(tmp_path, sd)
    assert torch.equal(out["n.weight"], sd["n.weight"]) and "n.weight_scale" in out
    assert not any("scaled" in n for n in summary.notes)


def test_pt_sources_fold_too(tmp_path):
    q = (torch.randn(8, 8) * 10).to(E4M3)
    torch.save({"a.weight": q, "a.scale_weight": torch.tensor([0.25]),
                "scaled_fp8": torch.zeros(0, dtype=E4M3)}, tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "m.gguf", qtype=None)
    assert torch.equal(load_state_dict(tmp_path / "m.gguf")["a.weight"], q.float() * 0.25)


def test_a_scaled_fp8_wan_model_converts_to_the_right_model(tmp_path):
    """What a user with a Comfy-Org/Kijai fp8_scaled Wan file gets: the model of the true weights."""
    torch.manual_seed(3)
    model = TinyVideoDiT(dim=256, ffn=512, layers=1)
    sd, true = {}, {}
    for k, v in model.state_dict().items():
        if v.dim() == 2 and k.endswith(".weight") and min(v.shape) >= 256:
            s = v.abs().max() / 448
            sd[k], sd[k[:-len("weight")] + "scale_weight"] = _fp8(v, s), s.reshape(1)
            true[k] = sd[k].float() * s
        else:
            sd[k] = true[k] = v.clone()
    sd["scaled_fp8"] = torch.zeros(2, dtype=E4M3)
    save_file(sd, tmp_path / "wan_fp8_scaled.safetensors")
    convert(tmp_path / "wan_fp8_scaled.safetensors", tmp_path / "wan.gguf", qtype="Q8_0")
    ref = TinyVideoDiT(dim=256, ffn=512, layers=1)
    ref.load_state_dict(true)
    got = TinyVideoDiT(dim=256, ffn=512, layers=1)
    load_model(got, tmp_path / "wan.gguf")
    x = torch.randn(1, 16, 2, 8, 8)
    t, ctx = torch.tensor([500.0]), torch.randn(1, 8, 256)
    with torch.no_grad():
        a, b = ref(x, t, ctx), got(x, t, ctx)
    assert torch.allclose(a, b, rtol=0.05, atol=0.05 * a.abs().max().item())


# -- refused, by name, before anything is written ---------------------------------------------


@pytest.mark.parametrize("sd, meta, match", [
    ({"a.weight_scale": torch.ones(1), "b.weight": torch.ones(2, 2)},
     {"_quantization_metadata": json.dumps({"layers": {"a": {"format": "float8_e4m3fn"}}})},
     r"no a\.weight beside it"),
    ({"a.weight": torch.ones(8, 8).to(E4M3), "a.weight_scale": torch.ones(3)}, None,
     r"fits no per-tensor, per-row or block layout"),
    ({"a.weight": torch.ones(300, 8).to(E4M3), "a.weight_scale": torch.ones(7, 1)}, None,
     r"fits no per-tensor, per-row or block layout"),  # neither 128-row blocks nor a divisor
    ({"a.weight": torch.ones(8, 4, dtype=torch.uint8), "a.weight_scale": torch.ones(8, 1).to(E4M3),
      "a.weight_scale_2": torch.ones(())}, None, r"two-level weight scales"),
    ({"a.weight": torch.ones(8, 4, dtype=torch.uint8), "a.weight_scale": torch.ones(())}, None,
     r"packed in bytes"),
    ({"a.weight": torch.ones(8, 32).to(E4M3), "a.weight_scale": torch.ones(8, 1, dtype=torch.uint8)},
     None, r"scale stored as torch\.uint8"),
    ({"a.weight": torch.ones(8, 8).to(E4M3)}, {"_quantization_metadata": json.dumps(
        {"layers": {"a": {"format": "nvfp4"}}})}, r"a\.weight.*stored as nvfp4"),
    ({"a.weight": torch.ones(8, 8).to(E4M3)}, {"_quantization_metadata": json.dumps(
        {"layers": {"a": {"format": "float8_e4m3fn"}}})}, r"has no weight scale"),
    ({"a.weight": torch.ones(8, 8)}, {"_quantization_metadata": "not json"},
     r"_quantization_metadata is not a quantization record"),
    ({"a.weight": torch.ones(8, 8).to(E4M3), "a.weight_scale": torch.ones(()),
      "a.comfy_quant": torch.tensor(list(b"{oops"), dtype=torch.uint8)}, None,
     r"a\.comfy_quant.*not a layer format record"),
    ({"a.weight": torch.ones(8, 8).to(E4M3), "a.weight_scale": torch.ones(()),
      "a.weight_scale_inv": torch.ones(())}, None, r"two scales for one weight"),
    ({"mask": torch.ones(4, dtype=torch.uint8)}, None, r"mask.*dtype uint8 has no GGUF type"),
    ({"a.weight": torch.ones(8, 8, dtype=torch.int8), "a.weight_scale": torch.ones(8, 1),
      "a.weight_zero_point": torch.zeros(8, 1, dtype=torch.int8)}, None, r"a zero point"),
    ({"scaled_fp8": torch.zeros(2, dtype=E4M3), "a.scale_weight": torch.ones(1)}, None,
     r"no a\.weight beside it"),
])
def test_refused_by_name(tmp_path, sd, meta, match):
    src = tmp_path / "bad.safetensors"
    save_file(sd, src, metadata=meta)
    with pytest.raises(GGUFError, match=match):
        open_source(src)
    with pytest.raises(GGUFError, match=match):
        convert(src, tmp_path / "bad.gguf", qtype=None)
    assert not (tmp_path / "bad.gguf").exists()


def test_from_gguf_reads_a_comfyui_fp8_scaled_text_encoder(tmp_path):
    """ComfyUI's ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` shape of file: transformers' names,
    fp8 weights with ``scale_weight``, the ``scaled_fp8`` marker. Built as its true weights, each
    read and cast to the requested dtype one at a time."""
    import ggufvideo

    transformers = pytest.importorskip("transformers")
    cfg = transformers.UMT5Config(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=96,
                                  num_layers=2, feed_forward_proj="gated-gelu")
    torch.manual_seed(4)
    ref = transformers.UMT5EncoderModel(cfg).eval()
    sd = {"scaled_fp8": torch.zeros(2, dtype=E4M3)}
    true = {}
    for k, v in ref.state_dict().items():
        if k == "encoder.embed_tokens.weight":
            continue
        if v.dim() == 2 and "embed" not in k and "shared" not in k and "relative" not in k:
            s = v.abs().max() / 448
            sd[k], sd[k.removesuffix("weight") + "scale_weight"] = _fp8(v, s), s.reshape(1)
            true[k] = sd[k].float() * s
        else:
            sd[k] = true[k] = v.clone()
    save_file(sd, tmp_path / "umt5_fp8_scaled.safetensors")
    ref.load_state_dict(true, strict=False)
    ids = torch.tensor([[5, 9, 1]])
    built = ggufvideo.from_gguf(tmp_path / "umt5_fp8_scaled.safetensors")
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids).last_hidden_state,
                           ref(input_ids=ids).last_hidden_state)
    half = ggufvideo.from_gguf(tmp_path / "umt5_fp8_scaled.safetensors", dtype="bfloat16")
    q = half.encoder.block[0].layer[0].SelfAttention.q.weight
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, true["encoder.block.0.layer.0.SelfAttention.q.weight"].bfloat16())


def test_inspect_describes_a_scaled_checkpoint(tmp_path, capsys):
    import json as _json

    from ggufvideo.cli import main

    q = (torch.randn(8, 8) * 10).to(E4M3)
    path = tmp_path / "umt5_fp8_scaled.safetensors"
    save_file({"scaled_fp8": torch.zeros(2, dtype=E4M3), "a.weight": q,
               "a.scale_weight": torch.tensor([0.5])}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 scaled weight(s) multiplied" in out and "a.weight  float32  8x8" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = _json.loads(capsys.readouterr().out)
    assert info["kind"] == "safetensors" and info["totals"] == {"float32": {"count": 1,
                                                                            "bytes": 68}}


def test_a_scaled_files_type_tag_is_not_carried_into_the_name(tmp_path):
    from ggufvideo.reader import GGUFFile

    q = (torch.randn(8, 8) * 10).to(E4M3)
    src = tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    save_file({"scaled_fp8": torch.zeros(2, dtype=E4M3), "a.weight": q,
               "a.scale_weight": torch.tensor([0.5])}, src)
    convert(src, tmp_path / "out.gguf", qtype=None)
    with GGUFFile(tmp_path / "out.gguf") as g:
        assert g.metadata["general.name"] == "wan2.2_t2v_high_noise_14B"
