"""LoRA files: every naming scheme parses to the same pairs; malformed files fail naming the key."""

from __future__ import annotations

import pytest
import torch

from ggufvideo.errors import LoraError
from ggufvideo.lora import parse_lora, read_lora
from ggufvideo.lora.targets import resolve

D, U = torch.randn(4, 32), torch.randn(16, 4)


@pytest.mark.parametrize("down_key, up_key", [
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_A", ".lora_B"),
])
def test_every_suffix_scheme_gives_one_pair(down_key, up_key):
    lf = parse_lora({"blocks.0.q" + down_key: D, "blocks.0.q" + up_key: U})
    (e,) = lf
    assert e.target == "blocks.0.q" and e.down is D and e.up is U and e.scale == 1.0


def test_kohya_alpha_scales_by_alpha_over_rank():
    lf = parse_lora({"lora_unet_blocks_0_self_attn_q.lora_down.weight": D,
                     "lora_unet_blocks_0_self_attn_q.lora_up.weight": U,
                     "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(2.0)})
    (e,) = lf
    assert e.kohya and e.rank == 4 and e.scale == 0.5


def test_diff_and_diff_b_are_full_deltas():
    lf = parse_lora({"diffusion_model.blocks.0.norm3.diff": torch.ones(8),
                     "diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(16)})
    assert {e.target for e in lf} == {"diffusion_model.blocks.0.norm3",
                                      "diffusion_model.blocks.0.self_attn.q"}


@pytest.mark.parametrize("key, message", [
    ("blocks.0.q.weight", "not a LoRA: no key has a LoRA suffix"),
    ("blocks.0.q.dora_scale", "a DoRA magnitude without the LoRA pair"),
    ("blocks.0.q.hada_w1_a", "LoHa adapter without its hada_w1_b, hada_w2_a, hada_w2_b"),
    ("blocks.0.q.lokr_w1", "LoKr adapter without its lokr_w2_a, lokr_w2_b"),
    ("blocks.0.q.oft_blocks", "OFT"),
    ("blocks.0.q.lora_mid.weight", "Tucker"),
])
def test_unsupported_or_unknown_keys_name_the_file_and_key(key, message):
    with pytest.raises(LoraError, match=message) as info:
        parse_lora({key: torch.ones(2, 2)}, source="style.safetensors")
    assert "style.safetensors" in str(info.value) and key in str(info.value)


def test_down_without_up_and_mismatched_ranks_are_errors():
    with pytest.raises(LoraError, match="no up"):
        parse_lora({"a.lora_down.weight": D}, source="x.safetensors")
    with pytest.raises(LoraError, match="rank-r pair"):
        parse_lora({"a.lora_down.weight": D, "a.lora_up.weight": torch.randn(16, 3)})


def test_safetensors_file_reads_like_its_state_dict(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    sd = {"transformer.blocks.0.attn1.to_q.lora_A.weight": D,
          "transformer.blocks.0.attn1.to_q.lora_B.weight": U}
    st.save_file(sd, tmp_path / "l.safetensors")
    lf = read_lora(tmp_path / "l.safetensors")
    (e,) = lf
    assert lf.source.endswith("l.safetensors") and torch.equal(e.down, D) and torch.equal(e.up, U)


def test_kohya_underscores_resolve_against_the_models_names_only():
    # "attn_q" and "attn.q" are told apart by which names the model has.
    shapes = {"blocks.0.self_attn.q.weight": (16, 32), "blocks.0.self_attn_q_proj.weight": (16, 32)}
    lf = parse_lora({"lora_unet_blocks_0_self_attn_q.lora_down.weight": D,
                     "lora_unet_blocks_0_self_attn_q.lora_up.weight": U})
    res = resolve(lf, shapes)
    assert list(res.weights) == ["blocks.0.self_attn.q.weight"] and not res.unmatched


def test_a_lora_on_a_split_layer_lands_on_the_rows_of_a_fused_one():
    from ggufvideo.lora.targets import SegmentOps

    ops = SegmentOps()
    v = [("qkv.weight", 0, 12)]
    q, k, val = ops.split(v, [4, 4, 4])
    assert k == [("qkv.weight", 4, 8)]
    assert ops.cat([q, val]) == [("qkv.weight", 0, 4), ("qkv.weight", 8, 12)]
    assert ops.swap_halves(v) == [("qkv.weight", 6, 12), ("qkv.weight", 0, 6)]


def test_prefixes_are_removed_one_after_another():
    """A peft wrapper around a container (``base_model.model.transformer.``) and DiffSynth's
    ``pipe.dit.`` reach the model's own names."""
    shapes = {"blocks.0.attn1.to_q.weight": (16, 32), "blocks.0.attn1.to_k.weight": (16, 32)}
    lf = parse_lora({"base_model.model.transformer.blocks.0.attn1.to_q.lora_A.weight": D,
                     "base_model.model.transformer.blocks.0.attn1.to_q.lora_B.weight": U,
                     "pipe.dit.blocks.0.attn1.to_k.lora_A.default.weight": D,
                     "pipe.dit.blocks.0.attn1.to_k.lora_B.default.weight": U})
    res = resolve(lf, shapes)
    assert sorted(res.weights) == sorted(shapes) and not res.unmatched
