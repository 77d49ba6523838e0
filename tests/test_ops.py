"""Quant-aware layers: each one matches its torch layer holding the decoded weights, bit for bit;
the swap keeps a model's own subclasses, names, hooks and state-dict keys."""

from __future__ import annotations

import copy
import pickle

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from torch import nn

from ggufvideo import GGMLTensor, ops
from ggufvideo.ops import (
    QuantConv3d,
    QuantLayer,
    QuantLinear,
    dequantize_weight,
    quant_class_for,
    set_compute_dtype,
    swap_quant_layers,
)


def ggml(t: torch.Tensor, qtype: T = T.Q8_0, dtype: torch.dtype = torch.float32) -> GGMLTensor:
    """``t`` quantized by gguf-py (byte-identical to ggml for Q8_0/Q4_0), in 32-element rows."""
    blocks = gguf.quants.quantize(t.detach().float().reshape(-1, 32).numpy(), qtype)
    return GGMLTensor(torch.from_numpy(np.ascontiguousarray(blocks)), qtype, t.shape, dtype)


def quantize_params(module: nn.Module, qtype: T = T.Q8_0) -> nn.Module:
    """Replace every parameter whose size is a whole number of blocks by a GGMLTensor."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.numel() % 32 == 0:
                m._parameters[name] = nn.Parameter(ggml(p, qtype), requires_grad=False)
    return module


def decoded_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The plain-torch twin: original classes, weights decoded once."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        original = getattr(type(m), "_ggml_original_class", None)
        if original is not None:
            m.__class__ = original
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(dequantize_weight(p, dtype), requires_grad=False)
    return twin


LAYERS = [
    (lambda: nn.Linear(64, 32), (5, 64)),
    (lambda: nn.Linear(64, 32, bias=False), (2, 3, 64)),
    (lambda: nn.Conv1d(8, 16, 4, padding=1), (2, 8, 20)),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), (1, 8, 6, 6)),
    (lambda: nn.Conv3d(16, 64, (1, 2, 2), stride=(1, 2, 2)), (1, 16, 2, 8, 8)),  # Wan patch embed
    (lambda: nn.Conv3d(8, 8, 3, padding=1), (1, 8, 3, 5, 5)),  # Wan VAE 3x3x3
    (lambda: nn.ConvTranspose1d(8, 16, 4, stride=2), (2, 8, 7)),
    (lambda: nn.ConvTranspose2d(8, 16, 3, stride=2, output_padding=1), (1, 8, 5, 5)),
    (lambda: nn.ConvTranspose3d(8, 8, 2, stride=2), (1, 8, 2, 3, 3)),
    (lambda: nn.LayerNorm(64), (4, 64)),
    (lambda: nn.GroupNorm(4, 32), (2, 32, 5)),
    (lambda: nn.RMSNorm(64, eps=1e-6), (4, 64)),
    (lambda: nn.RMSNorm(64), (4, 64)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make,shape", LAYERS, ids=lambda v: repr(v()) if callable(v) else "")
def test_quant_layer_is_bit_identical_to_torch_layer_with_decoded_weights(make, shape, dtype):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():  # norms start at ones/zeros: make their weights worth quantizing
        for p in layer.parameters():
            p.normal_()
    swap_quant_layers(layer)
    quantize_params(layer, T.Q4_0)
    assert isinstance(layer, QuantLayer) and isinstance(layer.weight, GGMLTensor)
    x = torch.randn(shape).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out, decoded_copy(layer, dtype)(x))


def test_quant_layers_accept_plain_weights_of_another_dtype():
    layer = swap_quant_layers(nn.Linear(32, 8))
    layer.to(torch.float16)
    x = torch.randn(3, 32)
    ref = F.linear(x, layer.weight.float(), layer.bias.float())
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_quant_embedding_decodes_only_the_looked_up_rows(qtype, monkeypatch):
    table = torch.randn(1000, 64)
    emb = swap_quant_layers(nn.Embedding(1000, 64))
    emb.weight = nn.Parameter(ggml(table, qtype), requires_grad=False)
    ids = torch.tensor([[3, 999, 3], [0, 17, 500]])
    decoded = []
    real = ops._dequantize_rows

    def spy(data, qt, *, dtype):
        decoded.append(data.shape[0])
        return real(data, qt, dtype=dtype)

    monkeypatch.setattr(ops, "_dequantize_rows", spy)
    out = emb(ids)
    assert decoded == [6]  # six rows, not a thousand
    assert torch.equal(out, emb.weight.dequantize()[ids])
    emb.compute_dtype = torch.bfloat16
    assert torch.equal(emb(ids), emb.weight.dequantize(torch.bfloat16)[ids])


def test_quant_embedding_with_max_norm_matches_torch():
    emb = swap_quant_layers(nn.Embedding(10, 32, max_norm=1.0))
    emb.weight = nn.Parameter(ggml(torch.randn(10, 32) * 3), requires_grad=False)
    raw = emb.weight.raw.clone()
    ids = torch.tensor([1, 2, 2, 7])
    ref = F.embedding(ids, emb.weight.dequantize(), max_norm=1.0)
    assert torch.equal(emb(ids), ref)
    assert torch.equal(emb.weight.raw, raw)  # the quantized table is never renormalized in place


class CausalConv3d(nn.Conv3d):
    """Like diffusers' WanCausalConv3d: its own forward pads causally, then calls super()."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._causal = (1, 1, 1, 1, 2, 0)
        self.padding = (0, 0, 0)

    def forward(self, x, cache_x=None):
        pad = list(self._causal)
        if cache_x is not None:
            x = torch.cat([cache_x, x], dim=2)
            pad[4] -= cache_x.shape[2]
        return super().forward(F.pad(x, pad))


class FP32LayerNorm(nn.LayerNorm):
    """Like diffusers' FP32LayerNorm: its own forward uses self.weight itself."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def test_swap_keeps_a_subclass_forward_and_runs_its_conv_quantized():
    torch.manual_seed(0)
    conv = CausalConv3d(8, 8, 3)
    swap_quant_layers(conv)
    assert isinstance(conv, CausalConv3d) and isinstance(conv, QuantConv3d)
    assert isinstance(conv, nn.Conv3d)
    assert type(conv).__mro__[1] is CausalConv3d  # the model's own forward runs first
    quantize_params(conv)
    x, cache = torch.randn(1, 8, 3, 5, 5), torch.randn(1, 8, 2, 5, 5)
    twin = decoded_copy(conv)
    assert type(twin) is CausalConv3d
    assert torch.equal(conv(x, cache), twin(x, cache))
    assert conv(x).shape == (1, 8, 3, 5, 5)  # causal padding applied: the subclass forward ran


def test_subclass_using_its_weight_directly_still_computes_the_right_thing():
    norm = swap_quant_layers(FP32LayerNorm(64))
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    quantize_params(norm)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(norm(x), decoded_copy(norm)(x))


def test_derived_classes_are_cached_named_and_mapped_once():
    cls = quant_class_for(CausalConv3d)
    assert cls is quant_class_for(CausalConv3d) and cls.__name__ == "QuantCausalConv3d"
    assert quant_class_for(cls) is cls
    assert quant_class_for(nn.Linear) is QuantLinear
    assert quant_class_for(nn.Sequential) is None
    assert quant_class_for(nn.modules.linear.NonDynamicallyQuantizableLinear).__mro__[2] is QuantLinear


def test_swap_keeps_names_hooks_and_state_dict_keys():
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), CausalConv3d(4, 4, 3), nn.LayerNorm(32))
    keys = list(model.state_dict())
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert swap_quant_layers(model) is model
    assert list(model.state_dict()) == keys
    assert [type(m).__name__ for m in model] == ["QuantLinear", "SiLU", "QuantCausalConv3d",
                                                 "QuantLayerNorm"]
    model[0](torch.randn(2, 32))
    assert seen == [torch.Size([2, 64])]
    swap_quant_layers(model)  # idempotent
    assert type(model[2]).__name__ == "QuantCausalConv3d"


def test_state_dict_returns_the_ggml_tensors():
    layer = quantize_params(swap_quant_layers(nn.Linear(64, 32)))
    sd = layer.state_dict()
    assert isinstance(sd["weight"], GGMLTensor) and sd["weight"].qtype == T.Q8_0
    assert torch.equal(sd["weight"].raw, layer.weight.raw)


def test_compute_dtype_is_per_instance_and_casts_input():
    a = quantize_params(swap_quant_layers(nn.Linear(64, 32)))
    b = copy.deepcopy(a)
    set_compute_dtype(a, torch.bfloat16)
    x = torch.randn(3, 64)
    assert a(x).dtype == torch.bfloat16  # autocast-like: input cast, output in compute dtype
    assert b(x).dtype == torch.float32  # the other model is unaffected
    assert QuantLinear.compute_dtype is None
    assert torch.equal(a(x), decoded_copy(a, torch.bfloat16)(x.bfloat16()))
    with pytest.raises(ValueError, match="floating"):
        set_compute_dtype(a, torch.int8)


def test_to_dtype_changes_compute_dtype_only_and_to_device_moves_raw_blocks():
    layer = quantize_params(swap_quant_layers(nn.Linear(64, 32)))
    raw = layer.weight.raw.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and isinstance(layer.weight, GGMLTensor)
    assert torch.equal(layer.weight.raw, raw)
    layer.half()
    assert layer.weight.dtype == torch.float16 and torch.equal(layer.weight.raw, raw)
    layer.to("cpu")
    assert isinstance(layer.weight, GGMLTensor) and torch.equal(layer.weight.raw, raw)


def test_quant_model_survives_deepcopy_and_pickle():
    model = nn.Sequential(nn.Linear(64, 32), CausalConv3d(4, 8, 3))
    quantize_params(swap_quant_layers(model))
    x, v = torch.randn(2, 64), torch.randn(1, 4, 2, 4, 4)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone[1]) is type(model[1]) and isinstance(clone[1].weight, GGMLTensor)
        assert torch.equal(clone[0](x), model[0](x)) and torch.equal(clone[1](v), model[1](v))


def test_layers_route_through_the_two_hooks(monkeypatch):
    calls = []
    real_linear, real_dequant = ops.quant_linear, ops.dequantize_weight

    def linear(x, w, b):
        calls.append("linear")
        return real_linear(x, w, b)

    def dequant(w, dtype, **kw):
        calls.append("dequantize")
        return real_dequant(w, dtype, **kw)

    monkeypatch.setattr(ops, "quant_linear", linear)
    monkeypatch.setattr(ops, "dequantize_weight", dequant)
    model = quantize_params(swap_quant_layers(nn.Sequential(nn.Linear(64, 32), nn.Unflatten(1, (2, 16)),
                                                            nn.Conv1d(2, 2, 16))))
    model(torch.randn(3, 64))
    # linear: its weight and bias through dequantize_weight; conv: weight and bias
    assert calls == ["linear"] + ["dequantize"] * 4


def test_conv_transpose_rejects_non_zero_padding_mode():
    layer = swap_quant_layers(nn.ConvTranspose1d(4, 4, 3))
    layer.padding_mode = "reflect"
    with pytest.raises(ValueError, match="zeros"):
        layer(torch.randn(1, 4, 5))
