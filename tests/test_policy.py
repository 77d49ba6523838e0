"""The quantization policy: keep rules, presets, overrides, block-size fallbacks."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from ggufvideo.errors import UnsupportedTypeError
from ggufvideo.policy import PRESETS, QuantPolicy, fits

Q4K = QuantPolicy.from_type("Q4_K")
Q4KM = QuantPolicy.from_type("Q4_K_M")


def q(policy: QuantPolicy, name: str, shape: tuple[int, ...],
      dtype: torch.dtype = torch.bfloat16) -> T:
    return policy.decide(name, shape, dtype).qtype


def test_weights_take_the_base_type():
    assert q(Q4K, "blocks.0.self_attn.q.weight", (5120, 5120)) == T.Q4_K
    assert q(Q4K, "blocks.0.attn1.to_q.weight", (1536, 1536)) == T.Q4_K


@pytest.mark.parametrize("name,shape", [
    ("blocks.0.self_attn.q.bias", (5120,)),
    ("blocks.0.norm3.weight", (5120,)),
    ("tiny.weight", (32, 32)),
])
def test_one_dim_and_tiny_tensors_stay_at_source_precision(name, shape):
    d = Q4K.decide(name, shape, torch.bfloat16)
    # a BF16 tensor that is not 2-D is kept F32 (exact), which every reader takes: diffusers'
    # GGUF loader hands BF16 bytes raw to the layers it does not replace
    assert d.qtype == (T.BF16 if len(shape) == 2 else T.F32) and d.keep
    assert Q4K.decide(name, shape, torch.float16).qtype == T.F16


@pytest.mark.parametrize("name,shape", [
    ("blocks.3.modulation", (1, 6, 5120)),                     # Wan original
    ("blocks.3.scale_shift_table", (1, 6, 5120)),              # Wan diffusers
    ("text_embedding.0.weight", (5120, 4096)),
    ("time_embedding.2.weight", (5120, 5120)),
    ("time_projection.1.weight", (30720, 5120)),
    ("condition_embedder.time_proj.weight", (30720, 5120)),
    ("condition_embedder.text_embedder.linear_1.weight", (5120, 4096)),
    ("head.head.weight", (64, 5120)),
    ("proj_out.weight", (64, 5120)),
    ("video_model.blocks.0.modulation", (1, 6, 3072)),         # prefixed twin backbone
    ("audio_model.text_embedding.0.weight", (3072, 4096)),
])
def test_layers_peers_keep_stay_high_precision(name, shape):
    d = Q4K.decide(name, shape, torch.float32)
    assert d.qtype == T.F32 and d.keep, d


@pytest.mark.parametrize("name", [
    "blocks.0.self_attn.v.weight", "blocks.0.self_attn.o.weight", "blocks.0.cross_attn.v.weight",
    "blocks.0.ffn.2.weight", "blocks.0.attn1.to_v.weight", "blocks.0.attn1.to_out.0.weight",
    "blocks.0.ffn.net.2.weight", "double_blocks.0.img_attn.proj.weight",
])
def test_k_m_presets_raise_sensitive_layers(name):
    assert q(Q4KM, name, (5120, 5120)) == T.Q5_K
    assert q(QuantPolicy.from_type("Q5_K_M"), name, (5120, 5120)) == T.Q6_K
    assert q(Q4KM, "blocks.0.self_attn.q.weight", (5120, 5120)) == T.Q4_K
    assert q(Q4KM, "blocks.0.ffn.0.weight", (13824, 5120)) == T.Q4_K


def test_presets_are_case_insensitive_and_named():
    p = QuantPolicy.from_type("q4_k_m")
    assert p.name == "Q4_K_M" and p.qtype == T.Q4_K and p.sensitive_qtype == T.Q5_K
    assert set(PRESETS) >= {"Q3_K_M", "Q4_K_M", "Q5_K_M", "Q4_K_S"}


def test_overrides_win_first_match_and_may_keep():
    p = QuantPolicy.from_type("Q4_K", overrides=[(r"ffn\.2\.weight$", "Q8_0"),
                                                 (r"ffn\.", "keep"),
                                                 (r"modulation", "Q4_K")])
    assert q(p, "blocks.0.ffn.2.weight", (5120, 13824)) == T.Q8_0
    d = p.decide("blocks.0.ffn.0.weight", (13824, 5120), torch.bfloat16)
    assert d.qtype == T.BF16 and d.keep and "override" in d.reason
    # an override beats the default keep rules
    assert q(p, "blocks.0.modulation", (1, 6, 5120)) == T.Q4_K


def test_extra_keep_patterns_and_keep_type():
    p = QuantPolicy.from_type("Q4_K", keep=[r"cross_attn"], keep_type="F16")
    assert q(p, "blocks.0.cross_attn.q.weight", (5120, 5120)) == T.F16
    assert q(p, "blocks.0.self_attn.q.bias", (5120,), torch.float32) == T.F16


def test_rows_that_do_not_fit_fall_back_along_the_chain_and_say_so():
    d = Q4K.decide("x.weight", (256, 96), torch.float32)  # 96 = 3 x 32
    assert d.qtype == T.Q5_0 and d.requested == T.Q4_K
    assert d.fallback == "Q4_K -> Q5_0" and "rows of 96" in d.reason
    d = QuantPolicy.from_type("Q6_K").decide("x.weight", (256, 96), torch.float32)
    assert d.qtype == T.Q8_0 and d.fallback == "Q6_K -> Q8_0"
    d = Q4K.decide("x.weight", (256, 40), torch.bfloat16)  # fits no block size
    assert d.qtype == T.BF16 and d.fallback == "Q4_K -> Q5_0 -> BF16" and d.keep


def test_transformer_patch_embeddings_stay_high_precision_like_published_files():
    # Wan's 5-D patch embedding stays high precision so diffusers' and ComfyUI-GGUF's loaders
    # (which have no quantized Conv3d) read our files: F32 from a BF16 source (diffusers reads
    # no BF16 outside its linears), the source's own type otherwise
    for name in ("patch_embedding.weight", "model.diffusion_model.patch_embedding.weight",
                 "vace_patch_embedding.weight", "img_in.proj.weight", "x_embedder.proj.weight"):
        d = Q4K.decide(name, (5120, 16, 1, 2, 2), torch.bfloat16)
        assert d.qtype == T.F32 and d.keep, name
        assert Q4K.decide(name, (5120, 16, 1, 2, 2), torch.float16).qtype == T.F16
    # an explicit override still quantizes it
    forced = QuantPolicy.from_type("Q4_K", overrides={r"patch_embedding": "Q4_K"})
    assert forced.decide("patch_embedding.weight", (5120, 16, 1, 2, 2), torch.float32).qtype == T.Q4_K


def test_five_dim_vae_conv_weights_are_quantized_when_the_elements_fit():
    # VAE conv3d [384, 384, 3, 3, 3]: 3,981,312 elements, divisible by 256
    assert q(Q4K, "decoder.conv.weight", (384, 384, 3, 3, 3)) == T.Q4_K
    # 4-D conv with rows of 3 falls back (rows are rows up to 4 dims)
    assert q(Q4K, "conv2d.weight", (64, 64, 3, 3), torch.float32) == T.F32


def test_integer_tensors_and_keep_all_policy_never_quantize():
    assert q(Q4K, "pos_ids", (4096, 256), torch.int64) == T.I64
    keep = QuantPolicy.from_type(None)
    assert q(keep, "blocks.0.self_attn.q.weight", (5120, 5120)) == T.BF16
    assert q(keep, "w", (256, 256), torch.float16) == T.F16


def test_float8_sources_keep_as_f16_and_float64_as_f32():
    assert q(Q4K, "w.bias", (256,), torch.float8_e4m3fn) == T.F16
    assert q(Q4K, "w.bias", (256,), torch.float64) == T.F32


def test_invalid_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid policy regex"):
        QuantPolicy.from_type("Q4_K", overrides={"(": "Q8_0"})


def test_unknown_type_is_a_clear_error():
    with pytest.raises(UnsupportedTypeError, match="Q9_K"):
        QuantPolicy.from_type("Q9_K")


def test_type_that_cannot_be_quantized_to_is_refused():
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        QuantPolicy.from_type("IQ2_XXS")
    with pytest.raises(UnsupportedTypeError, match="IQ1_S"):
        QuantPolicy.from_type("Q4_K", overrides={"x": "IQ1_S"})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 600), min_size=1, max_size=5),
       st.sampled_from(["Q4_K", "Q4_K_M", "Q3_K_M", "Q6_K", "Q8_0", "Q4_0", "IQ4_XS", "Q2_K"]),
       st.sampled_from(["blocks.0.ffn.2.weight", "blocks.0.self_attn.q.weight", "w"]))
def test_decided_type_always_fits_the_shape(shape, qtype, name):
    d = QuantPolicy.from_type(qtype).decide(name, tuple(shape), torch.float32)
    assert fits(tuple(shape), d.qtype) or 0 in shape
