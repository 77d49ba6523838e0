"""Bake-in: convert --lora merges LoRAs into the weights they touch, requantized exactly."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import CONFIG, TARGETS, as_format, merged_delta, pairs

import ggufvideo
from ggufvideo import GGUFFile, convert, dequantize, quantize
from ggufvideo.cli import main as cli_main
from ggufvideo.errors import LoraError
from ggufvideo.models import get_family
from ggufvideo.models.tensors import TensorOps

diffusers = pytest.importorskip("diffusers")
st = pytest.importorskip("safetensors.torch")


def _raw(path):
    with GGUFFile(path) as g:
        return {n: (i.qtype, g.tensor_data(i).clone()) for n, i in g.tensors.items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A Wan GGUF in the original layout with ComfyUI's prefix: Q4_K weights, Q8_0 for the FFN
    down-projections, and the diffusers model's shapes."""
    torch.manual_seed(0)
    sd = diffusers.WanTransformer3DModel(**CONFIG).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    orig = get_family("wan").convert(sd, "diffusers", "original", TensorOps())
    path = tmp_path_factory.mktemp("bake") / "wan.gguf"
    policy = ggufvideo.QuantPolicy.from_type("Q4_K", overrides={r"ffn\.2\.weight$": "Q8_0"})
    ggufvideo.save_state_dict({"model.diffusion_model." + k: v for k, v in orig.items()}, path,
                              policy=policy)
    return path, shapes


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_touched_tensors_are_the_exact_quantizer_of_decoded_plus_delta(source, tmp_path, fmt):
    path, shapes = source
    p = pairs(shapes)
    dst = tmp_path / "baked.gguf"
    summary = convert(path, dst, qtype=None, loras=[(as_format(p, fmt), 0.7)])
    before, after = _raw(path), _raw(dst)
    orig_of = dict((d, o) for o, d in TARGETS)
    touched = {f"model.diffusion_model.{orig_of[k[:-7]]}.weight": d
               for k, d in merged_delta(p, 0.7).items()}
    assert sorted(summary.lora_changed) == sorted(touched)
    assert "lora: 4 tensor(s) changed" in str(summary)
    for name, (qtype, raw) in before.items():
        if name not in touched:
            assert after[name][0] == qtype and torch.equal(after[name][1], raw), name
            continue
        shape = shapes[[d for o, d in TARGETS if name.endswith(o + ".weight")][0] + ".weight"]
        w = dequantize(raw.reshape(shape[0], -1), qtype).reshape(shape) + touched[name]
        assert after[name][0] == qtype  # requantized to its own type
        assert torch.equal(after[name][1].reshape(shape[0], -1), quantize(w, qtype))


def test_a_type_given_types_the_touched_tensors_by_the_policy(source, tmp_path):
    path, shapes = source
    p = pairs(shapes)
    dst = tmp_path / "q8.gguf"
    summary = convert(path, dst, qtype="Q8_0", loras=[(as_format(p, "comfy"), 1.0)])
    for name in summary.lora_changed:
        assert summary.decisions[name].qtype.name == "Q8_0"


def test_cli_lora_with_scale_and_unmatched_keys_error(source, tmp_path, capsys):
    path, shapes = source
    lora = tmp_path / "style.safetensors"
    st.save_file(as_format(pairs(shapes), "kohya"), lora)
    dst = tmp_path / "cli.gguf"
    assert cli_main(["convert", str(path), str(dst), "--lora", f"{lora}:0.5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lora: 4 tensor(s) changed" in out and "style.safetensors" in out
    bad = tmp_path / "bad.safetensors"
    st.save_file({"lora_unet_blocks_9_self_attn_q.lora_down.weight": torch.zeros(2, 256),
                  "lora_unet_blocks_9_self_attn_q.lora_up.weight": torch.zeros(256, 2)}, bad)
    with pytest.raises(LoraError, match="match no tensor") as info:
        convert(path, tmp_path / "never.gguf", qtype=None, loras=[(bad, 1.0)])
    assert "bad.safetensors" in str(info.value) and "blocks_9" in str(info.value)
    assert not (tmp_path / "never.gguf").exists()


def test_safetensors_source_bakes_before_quantizing(tmp_path):
    torch.manual_seed(0)
    sd = diffusers.WanTransformer3DModel(**CONFIG).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    src = tmp_path / "wan.safetensors"
    st.save_file(sd, src)
    p = pairs(shapes)
    dst = tmp_path / "out.gguf"
    convert(src, dst, qtype="Q8_0", loras=[(as_format(p, "comfy"), 1.0)])
    after = _raw(dst)
    for key, d in merged_delta(p).items():
        qtype, raw = after[key]
        assert torch.equal(raw.reshape(shapes[key][0], -1), quantize(sd[key] + d, qtype))
