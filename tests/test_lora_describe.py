"""``ggufvideo inspect LORA``: what a LoRA file holds, without a model."""

from __future__ import annotations

import json

import pytest
import torch

from ggufvideo.cli import main
from ggufvideo.lora.describe import describe_lora

st = pytest.importorskip("safetensors.torch")


def _write(path, sd):
    st.save_file(sd, path)
    return str(path)


def test_describe_counts_naming_kinds_ranks_scales_and_widths(tmp_path):
    sd = {}
    for i in range(3):
        k = f"lora_unet_blocks_{i}_self_attn_q"
        sd.update({f"{k}.lora_down.weight": torch.ones(8, 5120),
                   f"{k}.lora_up.weight": torch.ones(5120, 8), f"{k}.alpha": torch.tensor(8.0)})
    sd["lora_unet_blocks_0_ffn_0.lora_down.weight"] = torch.ones(16, 5120)
    sd["lora_unet_blocks_0_ffn_0.lora_up.weight"] = torch.ones(13824, 16)
    sd["lora_unet_blocks_0_ffn_0.dora_scale"] = torch.ones(13824, 1)
    sd["lora_unet_blocks_0_norm3.diff"] = torch.ones(5120)
    sd["lora_unet_blocks_0_self_attn_o.diff_b"] = torch.ones(5120)
    info = describe_lora(_write(tmp_path / "wan.safetensors", sd))
    assert info["layers"] == 6 and info["naming"] == {"kohya / musubi-tuner": 6}
    assert info["kinds"] == {"LoRA pair": 4, "diff": 1}
    assert (info["dora"], info["bias_deltas"]) == (1, 1)
    assert info["ranks"] == {"8": 3, "16": 1} and info["scales"] == {"1": 4}
    assert info["widths"] == {"5120": 4}


def test_inspect_describes_a_lora_and_names_a_file_that_is_neither(tmp_path, capsys):
    lora = _write(tmp_path / "style.safetensors",
                  {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(4, 64),
                   "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(64, 4)})
    assert main(["inspect", lora]) == 0
    out = capsys.readouterr().out
    assert "1 layers" in out and "original (ComfyUI) (1)" in out and "input widths: 64 (1)" in out
    assert main(["inspect", lora, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"] == {"LoRA pair": 1}
    model = _write(tmp_path / "model.safetensors", {"blocks.0.weight": torch.ones(2, 2)})
    assert main(["inspect", model]) == 0  # not a LoRA: described as a checkpoint
    out = capsys.readouterr().out
    assert "safetensors checkpoint, 1 tensors" in out and "model: not recognised" in out
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert main(["inspect", str(notes)]) == 1
    assert "not a GGUF file, a LoRA or a checkpoint" in capsys.readouterr().err
