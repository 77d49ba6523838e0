"""apply_lora: unmerged adapters on quantized (and plain) models, every file format, exact removal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import (
    TARGETS,
    as_format,
    merged_delta,
    pairs,
    quantize_linears,
    quantized_wan,
    run_wan,
)
from torch import nn

import ggufvideo
from ggufvideo import GGMLTensor, TensorOperationError, apply_lora, fuse_lora, quantize
from ggufvideo.errors import LoraError
from ggufvideo.ops import LoraAdapter, lora_adapters

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def models():
    """(quantized Wan model, the same with its decoded weights as plain fp32 tensors)."""
    return quantized_wan()


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def _merged_reference(dense, deltas):
    ref = copy.deepcopy(dense)
    sd = ref.state_dict(keep_vars=True)
    for k, d in deltas.items():
        sd[k].data += d
    return ref


@pytest.mark.parametrize("fmt", ["kohya", "comfy", "diffusers", "diffusers_kohya"])
def test_each_format_matches_the_fp32_merged_reference(models, fmt):
    q, dense = models
    p = pairs(_shapes(q))
    base = run_wan(q)
    handle = apply_lora(q, as_format(p, fmt), scale=0.8)
    try:
        assert sorted(handle.targets) == sorted(d + ".weight" for _, d in TARGETS)
        out = run_wan(q)
        ref = run_wan(_merged_reference(dense, merged_delta(p, 0.8)))
        assert not torch.allclose(out, base, atol=1e-4)  # the LoRA does something
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        # the quantized weights were never touched
        assert all(isinstance(q.get_submodule(d).weight, GGMLTensor) for _, d in TARGETS)
    finally:
        handle.remove()
    assert torch.equal(run_wan(q), base)


def test_layer_output_is_the_base_product_plus_the_low_rank_terms_bit_for_bit():
    torch.manual_seed(0)
    layer = quantize_linears(nn.Linear(64, 32))
    x = torch.randn(5, 64)
    a = LoraAdapter(up=torch.randn(32, 4), down=torch.randn(4, 64), scale=0.3)
    b = LoraAdapter(up=torch.randn(32, 2), down=torch.randn(2, 64), scale=-1.5)
    lora_adapters(layer).extend([a, b])
    w = layer.weight.dequantize(torch.float32)
    expected = F.linear(x, w, layer.bias)
    expected = expected + F.linear(F.linear(x, a.down), a.up) * 0.3
    expected = expected + F.linear(F.linear(x, b.down), b.up) * -1.5
    assert torch.equal(layer(x), expected)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_peft_adapters_on_our_layers_match_ours_bit_for_bit(device):
    """peft's LoRA layers wrapping our quant-aware ones give the bits of our reference path; on
    CUDA (enough rows for the decode + GEMM kernels) our fused path agrees to rounding."""
    peft = pytest.importorskip("peft")
    from ggufvideo import ops

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    quantize_linears(net)
    net = net.to(device)
    ours = copy.deepcopy(net)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    wrapped = peft.get_peft_model(net, cfg)
    sd = {}
    for name in ("0", "2"):
        layer = wrapped.base_model.model.get_submodule(name)
        sd[f"{name}.lora_A.weight"] = layer.lora_A["default"].weight.detach().clone()
        sd[f"{name}.lora_B.weight"] = layer.lora_B["default"].weight.detach().clone()
        sd[f"{name}.alpha"] = torch.tensor(8.0)
    apply_lora(ours, sd)
    x = torch.randn(3 if device == "cpu" else 300, 64, device=device)
    with torch.no_grad():
        theirs = wrapped(x)
        fused = ours(x)
        ops.set_lora_fusion(False)
        try:
            assert torch.equal(theirs, ours(x))
        finally:
            ops.set_lora_fusion(None)
        assert torch.allclose(fused, theirs, rtol=1e-4, atol=1e-4)


def test_remove_restores_bit_exactly_and_set_scale_rescales(models):
    q, dense = models
    p = pairs(_shapes(q))
    base = run_wan(q)
    h = apply_lora(q, as_format(p, "comfy"))
    h.set_scale(0.0)
    assert torch.equal(run_wan(q), base)
    h.set_scale(2.0)
    ref = run_wan(_merged_reference(dense, merged_delta(p, 2.0)))
    assert torch.allclose(run_wan(q), ref, rtol=1e-4, atol=1e-5)
    h.remove()
    assert torch.equal(run_wan(q), base)
    assert all(not q.get_submodule(d).__dict__.get("lora_adapters") for _, d in TARGETS)
    with pytest.raises(RuntimeError, match="already removed"):
        h.remove()


def test_loras_stack_and_come_off_in_any_order(models):
    q, dense = models
    shapes = _shapes(q)
    p1, p2 = pairs(shapes, seed=1), pairs(shapes, rank=8, seed=2)
    base = run_wan(q)
    h1 = apply_lora(q, as_format(p1, "kohya"), scale=0.5)
    h2 = apply_lora(q, as_format(p2, "diffusers"), scale=1.0)
    both = {k: merged_delta(p1, 0.5)[k] + merged_delta(p2)[k] for k in merged_delta(p1)}
    assert torch.allclose(run_wan(q), run_wan(_merged_reference(dense, both)), rtol=1e-4, atol=1e-5)
    h1.remove()
    assert torch.allclose(run_wan(q), run_wan(_merged_reference(dense, merged_delta(p2))), rtol=1e-4,
                          atol=1e-5)
    h2.remove()
    assert torch.equal(run_wan(q), base)


def test_diff_and_diff_b_apply_and_restore_exactly(models):
    q, dense = models
    base = run_wan(q)
    g = torch.Generator().manual_seed(3)
    norm = q.blocks[0].norm2.weight
    sd = {"diffusion_model.blocks.0.norm3.diff": torch.randn(norm.shape, generator=g) * 0.1,
          "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(256, generator=g) * 0.1,
          "diffusion_model.blocks.0.self_attn.k.diff": torch.randn(256, 256, generator=g) * 0.01}
    original_norm = q.blocks[0].norm2.weight
    h = apply_lora(q, sd, scale=0.5)
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.blocks[0].norm2.weight += 0.5 * sd["diffusion_model.blocks.0.norm3.diff"]
        ref.blocks[0].attn1.to_q.bias += 0.5 * sd["diffusion_model.blocks.0.self_attn.q.diff_b"]
        ref.blocks[0].attn1.to_k.weight += 0.5 * sd["diffusion_model.blocks.0.self_attn.k.diff"]
    assert torch.allclose(run_wan(q), run_wan(ref), rtol=1e-4, atol=1e-5)
    h.remove()
    assert q.blocks[0].norm2.weight is original_norm
    assert torch.equal(run_wan(q), base)


def test_unmatched_keys_are_an_error_naming_file_and_key_unless_not_strict(models, tmp_path):
    q, _ = models
    st = pytest.importorskip("safetensors.torch")
    sd = as_format(pairs(_shapes(q)), "comfy")
    sd["diffusion_model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(4, 256)
    sd["diffusion_model.blocks.7.self_attn.q.lora_B.weight"] = torch.zeros(256, 4)
    path = tmp_path / "style.safetensors"
    st.save_file(sd, path)
    base = run_wan(q)
    with pytest.raises(LoraError, match="match no tensor") as info:
        apply_lora(q, path)
    assert "style.safetensors" in str(info.value) and "blocks.7.self_attn.q" in str(info.value)
    assert torch.equal(run_wan(q), base)  # nothing was applied
    h = apply_lora(q, path, strict=False)
    assert len(h.unmatched) == 2 and len(h.targets) == len(TARGETS)
    h.remove()


def test_a_diffusers_named_lora_applies_to_a_model_with_the_original_names():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()
            self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

        def forward(self, x):
            a = self.self_attn
            return self.ffn(a.o(a.q(x) + a.k(x) + a.v(x)))

    class Orig(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])
            self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(32, 32))
            self.head = nn.Module()
            self.head.modulation = nn.Parameter(torch.zeros(1, 2, 32))

        def forward(self, x):
            return self.blocks[0](x)

    model = Orig()  # plain torch layers: switched to quant-aware ones while adapters are on
    x = torch.randn(4, 32)
    base = model(x)
    down, up = torch.randn(2, 32) * 0.1, torch.randn(64, 2) * 0.1
    sd = {"transformer.blocks.0.ffn.net.0.proj.lora_A.weight": down,
          "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": up}
    h = apply_lora(model, sd)
    assert h.targets == ["blocks.0.ffn.0.weight"] and h.layout == "wan:diffusers"
    ref = copy.deepcopy(model)
    h2 = None
    with torch.no_grad():
        lin = ref.blocks[0].ffn[0]
        lin.__dict__.pop("lora_adapters")
        lin.weight += up @ down
        assert torch.allclose(model(x), ref(x), atol=1e-6)
    h.remove()
    assert type(model.blocks[0].ffn[0]) is nn.Linear and h2 is None
    assert torch.equal(model(x), base)


def test_fused_cuda_path_logic_matches_the_reference_on_cpu(monkeypatch):
    """The fused path (the base product, ``down @ x`` for all adapters packed into one GEMM, the
    up-projection added in place) run on the CPU through the torch decoder: the same values as
    the reference path."""
    from ggufvideo import kernels, ops

    torch.manual_seed(0)
    layer = quantize_linears(nn.Linear(256, 64))
    adapters = [LoraAdapter(up=torch.randn(64, 4), down=torch.randn(4, 256), scale=0.5),
                LoraAdapter(up=torch.randn(64, 8), down=torch.randn(8, 256), scale=2.0)]
    lora_adapters(layer).extend(adapters)
    x = torch.randn(2, 70, 256)
    with torch.no_grad():
        ref = layer(x)
        monkeypatch.setattr(ops, "_gpu_kernels", lambda w: kernels)
        fused = layer(x)
        assert fused.shape == ref.shape and torch.allclose(fused, ref, rtol=1e-5, atol=2e-3)
        assert "_lora_pack" in layer.__dict__
        adapters[0].scale = -1.0  # a new scale rebuilds the packed up-projection
        ref2 = x @ layer.weight.dequantize().T + layer.bias
        ref2 += F.linear(F.linear(x, adapters[0].down), adapters[0].up) * -1.0
        ref2 += F.linear(F.linear(x, adapters[1].down), adapters[1].up) * 2.0
        assert torch.allclose(layer(x), ref2, rtol=1e-5, atol=2e-3)
    # needing gradients takes the reference path
    assert layer(x.requires_grad_()).is_contiguous()


def test_fuse_lora_requantizes_each_touched_weight_with_the_exact_quantizer(models):
    q, _ = models
    model = copy.deepcopy(q)
    p = pairs(_shapes(model))
    deltas = merged_delta(p, 0.5)
    before = {k: model.state_dict(keep_vars=True)[k] for k in deltas}
    changed = fuse_lora(model, as_format(p, "kohya"), scale=0.5)
    assert sorted(changed) == sorted(deltas)
    for k, d in deltas.items():
        new = model.state_dict(keep_vars=True)[k]
        expected = quantize(before[k].dequantize(torch.float32) + d, before[k].qtype)
        assert isinstance(new, GGMLTensor) and new.qtype == before[k].qtype
        assert torch.equal(new.raw.reshape(expected.shape), expected)


def test_in_place_merges_on_quantized_weights_point_to_fuse_lora_and_bake_in():
    w = GGMLTensor(quantize(torch.randn(8, 32), "Q8_0"), "Q8_0", (8, 32), torch.float32)
    with pytest.raises(TensorOperationError, match="fuse_lora.*--lora"):
        w.add_(torch.ones(8, 32))
    assert ggufvideo.fuse_lora is fuse_lora


@pytest.mark.gpu
def test_fused_cuda_path_keeps_the_base_product_and_matches_the_reference(monkeypatch):
    from ggufvideo import kernels, ops

    if not torch.cuda.is_available() or not kernels.is_available("cuda", "Q4_K"):
        pytest.skip("needs CUDA and triton")
    calls = []
    up_add = kernels.lora_up_add

    def counting(*args):
        calls.append(args[0].shape)
        return up_add(*args)

    monkeypatch.setattr(kernels, "lora_up_add", counting)  # the reference path does not call it
    torch.manual_seed(0)
    layer = quantize_linears(nn.Linear(512, 384), "Q4_K").to(torch.bfloat16).cuda()
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        base = layer(x)
        a = LoraAdapter(up=torch.randn(384, 32) * 0.05, down=torch.randn(32, 512) * 0.05, scale=0.0)
        lora_adapters(layer).append(a)
        assert torch.equal(layer(x), base)  # scale 0: the base product is the same bits
        a.scale = 0.8
        fused = layer(x)
        ops.set_lora_fusion(False)
        try:
            ref = layer(x)
        finally:
            ops.set_lora_fusion(None)
        assert calls == [(300, 384)] * 2  # the fused path ran
        assert torch.allclose(fused.float(), ref.float(), rtol=2e-2, atol=2e-2)
