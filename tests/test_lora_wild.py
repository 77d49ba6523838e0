"""LoRA files as they are found in the wild: deltas of plain parameters (modulation,
scale_shift_table), lightx2v's ``diff_m``, peft adapter names, keys of no known scheme, and a
text-encoder part beside the transformer's."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import quantized_wan

import ggufvideo
from ggufvideo import apply_lora
from ggufvideo.errors import LoraError
from ggufvideo.lora import read_lora
from ggufvideo.lora.describe import describe_lora

diffusers = pytest.importorskip("diffusers")
save_file = pytest.importorskip("safetensors.torch").save_file


@pytest.fixture(scope="module")
def model():
    return quantized_wan()[0]


def _q_pair(prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{prefix}blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 256, generator=g),
            f"{prefix}blocks.0.self_attn.q.lora_up.weight": torch.randn(256, 4, generator=g)}


@pytest.mark.parametrize("key", ["diffusion_model.blocks.0.modulation.diff",
                                 "diffusion_model.blocks.0.diff_m",  # lightx2v's spelling
                                 "lora_unet_blocks_0_modulation.diff"])
def test_a_delta_of_the_modulation_lands_on_scale_shift_table(model, key):
    """Wan's per-block modulation is a plain parameter (diffusers: ``scale_shift_table``), not a
    layer's weight; distillation LoRAs change it with a full delta."""
    before = model.blocks[0].scale_shift_table.detach().clone()
    delta = torch.randn(before.shape)
    handle = apply_lora(model, {key: delta, **_q_pair()}, scale=0.5)
    assert "blocks.0.scale_shift_table" in handle.targets and not handle.unmatched
    assert torch.equal(model.blocks[0].scale_shift_table.detach(), before + 0.5 * delta)
    handle.remove()
    assert torch.equal(model.blocks[0].scale_shift_table.detach(), before)


def test_a_delta_of_the_head_modulation(model):
    before = model.scale_shift_table.detach().clone()
    delta = torch.randn(before.shape)
    handle = apply_lora(model, {"diffusion_model.head.modulation.diff": delta})
    assert handle.targets == ["scale_shift_table"]
    assert torch.equal(model.scale_shift_table.detach(), before + delta)
    handle.remove()


def test_peft_tensors_under_another_adapter_name(model):
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 256, generator=g), torch.randn(256, 4, generator=g)
    named = {"transformer.blocks.0.attn1.to_q.lora_A.my_style.weight": down,
             "transformer.blocks.0.attn1.to_q.lora_B.my_style.weight": up}
    default = {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
               "transformer.blocks.0.attn1.to_q.lora_B.weight": up}
    x = torch.randn(3, 256)
    outputs = []
    for sd in (named, default):
        handle = apply_lora(model, sd)
        outputs.append(model.blocks[0].attn1.to_q(x))
        handle.remove()
    assert torch.equal(*outputs)
    two = {**named, "transformer.blocks.0.attn1.to_k.lora_A.other.weight": down,
           "transformer.blocks.0.attn1.to_k.lora_B.other.weight": up}
    with pytest.raises(LoraError, match=r"peft adapters named \['my_style', 'other'\]"):
        read_lora(two)


def test_keys_of_no_known_scheme_are_unmatched_not_fatal(model):
    sd = {**_q_pair(), "diffusion_model.blocks.0.some_new_thing": torch.ones(3)}
    with pytest.raises(LoraError, match=r"1 key\(s\) of no known LoRA scheme.*some_new_thing"):
        apply_lora(model, sd)
    handle = apply_lora(model, sd, strict=False)  # the rest applies
    assert handle.targets == ["blocks.0.attn1.to_q.weight"]
    assert handle.unmatched == ["diffusion_model.blocks.0.some_new_thing"]
    handle.remove()


TE = {"lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.ones(4, 64),
      "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.ones(64, 4),
      "text_encoder.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight": torch.ones(4, 64),
      "text_encoder.encoder.block.0.layer.0.SelfAttention.k.lora_B.weight": torch.ones(64, 4)}


def test_a_text_encoder_part_is_left_out_with_a_warning(model, tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({**_q_pair(), **TE}, path)
    with pytest.warns(UserWarning, match="4 key.*text-encoder part.*left out"):
        handle = apply_lora(model, path)  # strict: the text-encoder keys are not "unmatched"
    assert handle.targets == ["blocks.0.attn1.to_q.weight"] and len(handle.skipped) == 4
    handle.remove()
    info = describe_lora(path)
    assert info["text_encoder_layers"] == 2


def test_a_text_encoder_part_does_not_stop_convert(tmp_path):
    from ggufvideo.demo_generate import write_demo_files

    files = write_demo_files(str(tmp_path))
    shapes = {k: v.shape for k, v in ggufvideo.load_state_dict(files["transformer"], lazy=True)
              .items()}
    q = next(k for k in shapes if k.endswith("blocks.0.self_attn.q.weight"))
    out_rows, in_cols = shapes[q]
    lora = {q.removesuffix(".weight") + ".lora_down.weight": torch.randn(2, in_cols),
            q.removesuffix(".weight") + ".lora_up.weight": torch.randn(out_rows, 2), **TE}
    save_file(lora, tmp_path / "l.safetensors")
    with pytest.warns(UserWarning, match="text-encoder part"):
        ggufvideo.convert(files["transformer"], tmp_path / "baked.gguf", qtype="Q8_0",
                          loras=[(str(tmp_path / "l.safetensors"), 1.0)])
    assert (tmp_path / "baked.gguf").exists()


@pytest.mark.parametrize("sd, named", [
    ({"b.lora_A.weight": torch.ones(2, 4), "b.lora_A.style.weight": torch.ones(2, 4),
      "b.lora_B.weight": torch.ones(4, 2)}, r"b\.lora_A\.weight and b\.lora_A\.style\.weight"),
    ({"blocks.0.diff_m": torch.ones(1, 6, 4), "blocks.0.modulation.diff": torch.ones(1, 6, 4)},
     r"blocks\.0\.diff_m and blocks\.0\.modulation\.diff"),
    ({"n.w_norm": torch.ones(4), "n.diff": torch.ones(4)}, r"n\.w_norm and n\.diff"),
])
def test_two_tensors_for_one_part_of_a_layer_are_refused(sd, named):
    with pytest.raises(LoraError, match="two tensors for the same part of one layer: " + named):
        read_lora(sd)


def test_a_text_encoder_lora_lands_on_a_text_encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.UMT5Config(vocab_size=32, d_model=16, d_kv=4, num_heads=4, d_ff=24,
                                  num_layers=1)
    te = transformers.UMT5EncoderModel(cfg).eval()
    q = "encoder.block.0.layer.0.SelfAttention.q"
    for prefix in ("text_encoder.", "lora_te_"):
        name = prefix + (q if prefix.endswith(".") else q.replace(".", "_"))
        handle = apply_lora(te, {f"{name}.lora_down.weight": torch.ones(2, 16),
                                 f"{name}.lora_up.weight": torch.ones(16, 2)})
        assert handle.targets == [q + ".weight"] and not handle.skipped
        handle.remove()


def test_a_lora_that_is_all_text_encoder_is_refused_on_a_transformer(model):
    with pytest.raises(LoraError, match="every key of this LoRA is for a text encoder"):
        apply_lora(model, TE)
    with pytest.warns(UserWarning, match="text-encoder part"):
        handle = apply_lora(model, TE, strict=False)
    assert not handle.targets and len(handle.skipped) == 4
