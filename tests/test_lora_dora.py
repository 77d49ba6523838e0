"""DoRA: a magnitude beside a LoRA rescales the adapted weight ``W + D`` to it, per output row or
per input feature; applied unmerged, removable, rescalable, baked exactly, and peft's DoRA agrees.

The reference here is written from the definition: ``g = m / ||W + D||`` (the norm over every
axis but the magnitude's), ``W'' = g * (W + D)``, and at strength ``s`` the merged float32 weight
``W + s * (W'' - W)``; the bias is untouched.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import (
    CONFIG,
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
from ggufvideo import GGMLTensor, GGUFFile, apply_lora, dequantize, fuse_lora, quantize
from ggufvideo.cli import main as cli_main
from ggufvideo.errors import LoraError
from ggufvideo.lora import parse_lora
from ggufvideo.models import get_family
from ggufvideo.models.tensors import TensorOps
from ggufvideo.ops import lora_adapters

diffusers = pytest.importorskip("diffusers")
st = pytest.importorskip("safetensors.torch")

#: format -> (magnitude suffix, axis, stored shape of the magnitude)
MAGNITUDE = {"kohya": (".dora_scale", 0, (-1, 1)),  # LyCORIS >= 3.2: per output row
             "comfy": (".dora_scale", 1, (1, -1)),  # older LyCORIS: per input feature
             "diffusers": (".lora_magnitude_vector", 0, (-1,)),  # peft / diffusers
             "diffusers_kohya": (".magnitude", 0, (-1,))}  # ai-toolkit
ORIG = {d: o for o, d in TARGETS}


def _norm(v, axis):
    """The norm of each slice of ``v`` along ``axis`` (over every other axis)."""
    return torch.linalg.vector_norm(v.transpose(0, axis).flatten(1), dim=1)


def dora_weight(w, d, m, axis, s):
    """``W + s * (W'' - W)`` with ``W'' = g * (W + D)``, ``g = m / ||W + D||`` along ``axis``
    (``W'' - W`` written ``(g - 1) W + g D``)."""
    shape = [1] * w.dim()
    shape[axis] = -1
    g = (m.reshape(-1) / _norm(w + d, axis)).reshape(shape)
    return w + s * ((g - 1) * w + g * d)


def magnitude(w, d, axis, gen):
    """A magnitude near ``||W + D||`` but not it, so the DoRA changes more than a plain LoRA."""
    n = _norm(w + d, axis)
    return n * (1 + 0.3 * torch.randn(n.shape, generator=gen))


def dora_lora(weights, p, fmt, seed=0):
    """(the LoRA ``p`` in ``fmt`` with a magnitude per layer, diffusers weight key -> (D, m,
    axis)); ``weights``: diffusers weight key -> the float32 weight the magnitudes are made for."""
    sd = as_format(p, fmt)
    suffix, axis, shape = MAGNITUDE[fmt]
    gen = torch.Generator().manual_seed(seed)
    refs = {}
    for key, d in merged_delta(p).items():
        name = key[:-len(".weight")]
        base = {"kohya": "lora_unet_" + ORIG[name].replace(".", "_"),
                "comfy": "diffusion_model." + ORIG[name], "diffusers": "transformer." + name,
                "diffusers_kohya": "lora_unet_" + name.replace(".", "_")}[fmt]
        m = magnitude(weights[key], d, axis, gen)
        sd[base + suffix] = m.reshape(shape)
        refs[key] = (d, m, axis)
    return sd, refs


@pytest.fixture(scope="module")
def models():
    """(quantized Wan model, the same with its decoded weights as plain fp32 tensors)."""
    return quantized_wan()


def _shapes(model):
    return {k: tuple(v.shape) for k, v in (model if isinstance(model, dict) else
                                           model.state_dict(keep_vars=True)).items()}


def _weights(model):
    return {k: v.dequantize(torch.float32) if isinstance(v, GGMLTensor) else v.detach()
            for k, v in model.state_dict(keep_vars=True).items()}


def _reference(dense, refs, s, extra=None):
    """``dense`` with each DoRA layer's weight merged at strength ``s`` (+ ``extra`` deltas)."""
    ref = copy.deepcopy(dense)
    sd = ref.state_dict(keep_vars=True)
    for k, (d, m, axis) in refs.items():
        sd[k].data = dora_weight(sd[k].data, d, m, axis, s)
    for k, d in (extra or {}).items():
        sd[k].data += d
    return ref


_CLOSE = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", list(MAGNITUDE))
def test_each_format_matches_the_fp32_merged_reference(models, fmt):
    """Every file format's magnitude, on its axis, at strength 0.6 and 1: the merged weights."""
    q, dense = models
    p = pairs(_shapes(q))
    sd, refs = dora_lora(_weights(dense), p, fmt)
    base = run_wan(q)
    h = apply_lora(q, sd, scale=0.6)
    try:
        assert sorted(h.targets) == sorted(refs)
        assert torch.allclose(run_wan(q), run_wan(_reference(dense, refs, 0.6)), **_CLOSE)
        h.set_scale(1.0)
        out = run_wan(q)
        assert torch.allclose(out, run_wan(_reference(dense, refs, 1.0)), **_CLOSE)
        plain = copy.deepcopy(dense)  # the same LoRA without its magnitudes: not the same output
        for k, d in merged_delta(p).items():
            plain.state_dict(keep_vars=True)[k].data += d
        assert not torch.allclose(out, run_wan(plain), rtol=1e-3, atol=1e-3)
        assert all(isinstance(q.get_submodule(d).weight, GGMLTensor) for _, d in TARGETS)
    finally:
        h.remove()
    assert torch.equal(run_wan(q), base)


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_strength_zero_and_remove_give_the_base_bits(models, fmt):
    """``set_scale(0)`` and ``remove()`` give the base output bit for bit; back at 1, the merged
    reference again."""
    q, dense = models
    sd, refs = dora_lora(_weights(dense), pairs(_shapes(q)), fmt)
    base = run_wan(q)
    h = apply_lora(q, sd)
    try:
        assert torch.allclose(run_wan(q), run_wan(_reference(dense, refs, 1.0)), **_CLOSE)
        h.set_scale(0.0)
        assert torch.equal(run_wan(q), base)
        h.set_scale(1.0)
        assert torch.allclose(run_wan(q), run_wan(_reference(dense, refs, 1.0)), **_CLOSE)
    finally:
        h.remove()
    assert torch.equal(run_wan(q), base)
    assert all(not q.get_submodule(d).__dict__.get("lora_adapters") for _, d in TARGETS)


class _Net(nn.Module):
    """A patch embedding (Wan's Conv3d) and two linears."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(16, 64, (1, 2, 2), stride=(1, 2, 2))
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 32)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.conv(x).flatten(2).transpose(1, 2))))


def _peft_dora(net, sd=None):
    """(``net`` wrapped in peft's DoRA, its state dict as peft saves it): random B and magnitudes,
    or those of ``sd``."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["conv", "fc1", "fc2"])
    wrapped = peft.get_peft_model(net, cfg)
    if sd is not None:
        peft.set_peft_model_state_dict(wrapped, sd)
    else:
        with torch.no_grad():
            for name in ("conv", "fc1", "fc2"):
                layer = wrapped.base_model.model.get_submodule(name)
                layer.lora_B["default"].weight.normal_(0, 0.1)
                mag = layer.lora_magnitude_vector["default"].weight
                mag.mul_(1 + 0.3 * torch.randn(mag.shape))
    return wrapped, peft.get_peft_model_state_dict(wrapped)


def test_peft_dora_files_match_peft_on_plain_and_quantized_models():
    """What peft saves for a DoRA (``lora_A/B.weight``, ``lora_magnitude_vector``, conv included)
    applies to a plain copy of the model and to a Q8_0 one: peft's own output, to rounding."""
    torch.manual_seed(0)
    base = _Net().eval()
    plain, quant = copy.deepcopy(base), quantize_linears(copy.deepcopy(base))
    decoded = copy.deepcopy(base)  # plain layers holding the Q8_0 weights' values
    for name in ("fc1", "fc2"):
        decoded.get_submodule(name).weight.data = quant.get_submodule(name).weight.dequantize()
    wrapped, sd = _peft_dora(base)
    assert {k.rpartition(".")[2] for k in sd if "magnitude" in k} == {"lora_magnitude_vector"}
    assert sd["base_model.model.conv.lora_magnitude_vector"].shape == (1, 64, 1, 1, 1)
    wrapped_q, _ = _peft_dora(decoded, sd)
    x = torch.randn(2, 16, 2, 8, 8)
    for model, theirs in ((plain, wrapped), (quant, wrapped_q)):
        h = apply_lora(model, sd)
        assert sorted(h.targets) == ["conv.weight", "fc1.weight", "fc2.weight"]
        with torch.no_grad():
            assert torch.allclose(model(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1])
def test_conv_magnitude_on_either_axis_matches_the_merged_conv(axis):
    """A LyCORIS ``dora_scale`` on a Conv3d, per output channel ``(out, 1, 1, 1, 1)`` or per input
    channel ``(1, in, 1, 1, 1)``: the conv with the merged weight; removed, the base bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(16, 64, (1, 2, 2), stride=(1, 2, 2)))
    conv = model[0]
    g = torch.Generator().manual_seed(1)
    down = torch.randn(4, 16, 1, 2, 2, generator=g) * 0.1
    up = torch.randn(64, 4, 1, 1, 1, generator=g) * 0.1
    w = conv.weight.detach().clone()
    d = (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    m = magnitude(w, d, axis, g)
    sd = {"0.lora_down.weight": down, "0.lora_up.weight": up, "0.alpha": torch.tensor(2.0),
          "0.dora_scale": m.reshape((64, 1, 1, 1, 1) if axis == 0 else (1, 16, 1, 1, 1))}
    x = torch.randn(2, 16, 3, 8, 8, generator=g)
    with torch.no_grad():
        base = model(x)
        h = apply_lora(model, sd, scale=0.6)
        expected = F.conv3d(x, dora_weight(w, d, m, axis, 0.6), conv.bias, stride=(1, 2, 2))
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
        h.remove()
        assert type(conv) is nn.Conv3d and torch.equal(model(x), base)


def test_a_dora_stacks_with_plain_loras_and_its_norm_ignores_them(models):
    """A plain LoRA and a DoRA on the same layers add up: ``W_s`` of the DoRA (its norm against
    the base weight and its own delta only, the plain one applied first) plus the plain delta;
    each removal leaves the other's output."""
    q, dense = models
    p_dora, p_plain = pairs(_shapes(q), seed=1), pairs(_shapes(q), rank=8, seed=2)
    sd, refs = dora_lora(_weights(dense), p_dora, "kohya")
    base = run_wan(q)
    h_plain = apply_lora(q, as_format(p_plain, "comfy"), scale=0.5)
    h_dora = apply_lora(q, sd, scale=0.8)
    try:
        both = _reference(dense, refs, 0.8, merged_delta(p_plain, 0.5))
        assert torch.allclose(run_wan(q), run_wan(both), **_CLOSE)
    finally:
        h_plain.remove()
    try:
        assert torch.allclose(run_wan(q), run_wan(_reference(dense, refs, 0.8)), **_CLOSE)
    finally:
        h_dora.remove()
    assert torch.equal(run_wan(q), base)


def test_two_doras_on_one_layer_are_an_error_that_applies_nothing(models, tmp_path):
    """A second DoRA on a layer that has one raises naming its file ("one DoRA at a time"); the
    layers it had reached before are rolled back: the output is the same bits."""
    q, dense = models
    p = pairs(_shapes(q), seed=3)
    first, _ = dora_lora(_weights(dense), {k: v for k, v in p.items() if "blocks.1" in k}, "kohya")
    second, _ = dora_lora(_weights(dense), p, "diffusers", seed=1)  # blocks.0 first, then a clash
    path = tmp_path / "second.safetensors"
    st.save_file(second, path)
    h = apply_lora(q, first)
    try:
        before = run_wan(q)
        with pytest.raises(LoraError, match="one DoRA at a time") as info:
            apply_lora(q, path)
        assert "second.safetensors" in str(info.value)
        assert torch.equal(run_wan(q), before)
        assert all(not lora_adapters(q.get_submodule(d)) for o, d in TARGETS if "blocks.0" in o)
    finally:
        h.remove()


def test_a_magnitude_of_the_wrong_shape_names_file_key_and_shapes(models, tmp_path):
    q, dense = models
    name = TARGETS[0][1]  # blocks.0.attn1.to_q: 256 x 256
    p = {name: pairs(_shapes(q))[name]}
    sd = as_format(p, "diffusers")
    key = f"transformer.{name}.lora_magnitude_vector"
    sd[key] = torch.ones(257)
    path = tmp_path / "bad.safetensors"
    st.save_file(sd, path)
    base = run_wan(q)
    with pytest.raises(LoraError, match="does not fit") as info:
        apply_lora(q, path)
    msg = str(info.value)
    assert "bad.safetensors" in msg and key in msg and "[257]" in msg and "[256, 256]" in msg
    assert torch.equal(run_wan(q), base)


def test_a_magnitude_without_its_pair_is_an_error_at_parse():
    key = "lora_unet_blocks_0_self_attn_q.dora_scale"
    with pytest.raises(LoraError, match="without the LoRA pair") as info:
        parse_lora({key: torch.ones(16, 1), "lora_unet_blocks_0_self_attn_k.lora_down.weight":
                    torch.ones(4, 32), "lora_unet_blocks_0_self_attn_k.lora_up.weight":
                    torch.ones(16, 4)}, source="style.safetensors")
    assert "style.safetensors" in str(info.value) and key in str(info.value)


def test_two_magnitudes_for_one_layer_are_an_error():
    sd = {"blocks.0.q.lora_A.weight": torch.ones(4, 32), "blocks.0.q.lora_B.weight":
          torch.ones(16, 4), "blocks.0.q.dora_scale": torch.ones(16, 1),
          "blocks.0.q.lora_magnitude_vector": torch.ones(16)}
    with pytest.raises(LoraError, match="two DoRA magnitudes") as info:
        parse_lora(sd, source="style.safetensors")
    assert "style.safetensors" in str(info.value) and "blocks.0.q" in str(info.value)


def test_fuse_lora_is_the_exact_quantizer_of_the_merged_weight(models):
    """``fuse_lora`` with a DoRA: each touched weight decoded, ``W_s - W`` added in float32,
    requantized to its own type -- the same bytes as the quantizer on the reference."""
    q, dense = models
    model = copy.deepcopy(q)
    sd, refs = dora_lora(_weights(dense), pairs(_shapes(q)), "kohya")
    before = {k: model.state_dict(keep_vars=True)[k] for k in refs}
    assert sorted(fuse_lora(model, sd, scale=0.6)) == sorted(refs)
    for k, (d, m, axis) in refs.items():
        new = model.state_dict(keep_vars=True)[k]
        expected = quantize(dora_weight(before[k].dequantize(torch.float32), d, m, axis, 0.6),
                            before[k].qtype)
        assert isinstance(new, GGMLTensor) and new.qtype == before[k].qtype
        assert torch.equal(new.raw.reshape(expected.shape), expected), k


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_convert_with_a_dora_bakes_the_exact_quantizer_of_the_merged_weight(tmp_path, fmt):
    """``ggufvideo convert SRC DST --lora dora.safetensors:0.6`` on a Q4_K GGUF (original names):
    the touched tensors are the quantizer's bytes of the merged reference, the rest are copied."""
    torch.manual_seed(0)
    sd = diffusers.WanTransformer3DModel(**CONFIG).state_dict()
    orig = get_family("wan").convert(sd, "diffusers", "original", TensorOps())
    src, dst, lora = tmp_path / "wan.gguf", tmp_path / "baked.gguf", tmp_path / "dora.safetensors"
    ggufvideo.save_state_dict({"model.diffusion_model." + k: v for k, v in orig.items()}, src,
                              policy=ggufvideo.QuantPolicy.from_type("Q4_K"))
    with GGUFFile(src) as g:
        raw = {n: (i.qtype, g.tensor_data(i).clone()) for n, i in g.tensors.items()}

    def name(key):  # diffusers weight key -> the GGUF's tensor name
        return f"model.diffusion_model.{ORIG[key[:-len('.weight')]]}.weight"

    weights = {k: dequantize(raw[name(k)][1].reshape(sd[k].shape[0], -1), raw[name(k)][0])
               .reshape(sd[k].shape) for k in merged_delta(pairs(_shapes(sd)))}
    lora_sd, refs = dora_lora(weights, pairs(_shapes(sd)), fmt)
    st.save_file(lora_sd, lora)
    assert cli_main(["convert", str(src), str(dst), "--lora", f"{lora}:0.6", "--quiet"]) == 0
    with GGUFFile(dst) as g:
        after = {n: (i.qtype, g.tensor_data(i).clone()) for n, i in g.tensors.items()}
    touched = {name(k): k for k in refs}
    for n, (qtype, data) in raw.items():
        if n not in touched:
            assert after[n][0] == qtype and torch.equal(after[n][1], data), n
            continue
        d, m, axis = refs[touched[n]]
        expected = quantize(dora_weight(weights[touched[n]], d, m, axis, 0.6), qtype)
        assert after[n][0] == qtype, n
        assert torch.equal(after[n][1].reshape(expected.shape), expected), n


@pytest.mark.gpu
def test_a_dora_on_a_cuda_model_matches_the_cpu_one():
    """On CUDA (weights there, norms taken there, bf16 compute): the CPU float32 output, to bf16
    rounding; at strength 0 the base bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    cpu = quantize_linears(nn.Sequential(nn.Linear(512, 384), nn.GELU(), nn.Linear(384, 256)),
                           "Q4_K")
    gpu = copy.deepcopy(cpu).to(torch.bfloat16).cuda()
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, (n, k) in ((0, (384, 512)), (2, (256, 384))):
        sd.update({f"{i}.lora_down.weight": torch.randn(8, k, generator=g) * 0.05,
                   f"{i}.lora_up.weight": torch.randn(n, 8, generator=g) * 0.05,
                   f"{i}.dora_scale": (1 + 0.3 * torch.rand(n, 1, generator=g)) * 0.6})
    x = torch.randn(300, 512, generator=g)
    with torch.no_grad():
        base = gpu(x.cuda().bfloat16())
        h_cpu, h_gpu = apply_lora(cpu, sd), apply_lora(gpu, sd)
        ref, out = cpu(x), gpu(x.cuda().bfloat16()).float().cpu()
        assert torch.allclose(out, ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
        h_gpu.set_scale(0.0)
        assert torch.equal(gpu(x.cuda().bfloat16()), base)
        h_cpu.remove()
        h_gpu.remove()


def test_a_magnitude_on_a_one_dimensional_tensor_is_an_error():
    """A magnitude beside a ``diff`` of a norm's weight (1-D): DoRA rescales rows of a matrix."""
    model = nn.Sequential(nn.LayerNorm(32))
    sd = {"0.diff": torch.ones(32), "0.dora_scale": torch.ones(32)}
    with pytest.raises(LoraError, match="DoRA rescales the rows of a Linear or Conv weight") as info:
        apply_lora(model, sd, strict=True)
    assert "0.dora_scale" in str(info.value)
    assert torch.equal(model[0].weight, torch.ones(32))


def test_doras_on_the_rows_of_a_fused_weight_rescale_only_their_rows():
    """q/k/v DoRAs landing on rows of a fused QKV (and a fused-QKV DoRA landing on one of q/k/v):
    each row's factor comes from its own LoRA rows; the three share the layer; a per-input
    magnitude on a part of the fused weight is refused."""
    from ggufvideo.lora.dora import check_stackable
    from ggufvideo.lora.pieces import adapter_for, check_piece
    from ggufvideo.lora.targets import Piece

    g = torch.Generator().manual_seed(5)
    layer = quantize_linears(nn.Linear(32, 24))  # the fused QKV: rows 0:8 q, 8:16 k, 16:24 v
    w = layer.weight.dequantize(torch.float32)
    merged = w.clone()
    for i, name in enumerate("qkv"):
        down, up = torch.randn(4, 32, generator=g) * 0.1, torch.randn(8, 4, generator=g) * 0.1
        rows = slice(8 * i, 8 * i + 8)
        m = magnitude(w[rows], up @ down, 0, g)
        (e,) = parse_lora({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up,
                           f"{name}.lora_magnitude_vector": m})
        a = adapter_for(Piece(e, "qkv.weight", (8 * i, 8 * i + 8), (0, 8), 24, 8), (24, 32), "f",
                        layer.weight)
        check_stackable(lora_adapters(layer), a, "qkv.weight", "f")
        lora_adapters(layer).append(a)
        merged[rows] = dora_weight(w[rows], up @ down, m, 0, 1.0)
    x = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, merged, layer.bias), **_CLOSE)
    # a fused-QKV LoRA's k rows on a model with a separate k
    down, up = torch.randn(4, 32, generator=g) * 0.1, torch.randn(24, 4, generator=g) * 0.1
    k = quantize_linears(nn.Linear(32, 8))
    wk = k.weight.dequantize(torch.float32)
    m = torch.rand(24, generator=g) + 0.5
    (e,) = parse_lora({"qkv.lora_A.weight": down, "qkv.lora_B.weight": up, "qkv.dora_scale":
                       m.reshape(24, 1)})
    lora_adapters(k).append(adapter_for(Piece(e, "k.weight", (0, 8), (8, 16), 8, 24), (8, 32),
                                        "f", k.weight))
    with torch.no_grad():
        expected = F.linear(x, dora_weight(wk, (up @ down)[8:16], m[8:16], 0, 1.0), k.bias)
        assert torch.allclose(k(x), expected, **_CLOSE)
    (e,) = parse_lora({"qkv.lora_A.weight": down, "qkv.lora_B.weight": up, "qkv.dora_scale":
                       torch.ones(1, 32)})
    with pytest.raises(LoraError, match="per input feature .* on a part"):
        check_piece(Piece(e, "k.weight", (0, 8), (8, 16), 8, 24), (8, 32), "f")


def test_a_small_magnitude_change_survives_bfloat16_compute():
    """Magnitudes 0.3% off the weight's norms in a bfloat16 model: each row's gain is 1.003 /
    0.997 (a factor rounded to bfloat16 itself would be 1 or 1.0078)."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    w = layer.weight.detach().float()  # the norms of the weights the model holds
    sign = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
    m = torch.linalg.vector_norm(w, dim=1) * (1 + 0.003 * sign)
    sd = {"0.lora_down.weight": torch.zeros(4, 256), "0.lora_up.weight": torch.zeros(64, 4),
          "0.dora_scale": m.reshape(64, 1)}
    model = nn.Sequential(layer)
    x = torch.randn(20000, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        base = model(x).float()
        h = apply_lora(model, sd)
        out = model(x).float()
        h.remove()
    gain = (out * base).sum(0) / (base * base).sum(0)
    assert torch.allclose(gain, 1 + 0.003 * sign, atol=5e-4)


def test_two_doras_on_one_tensor_in_one_conversion_are_an_error(models, tmp_path):
    """``convert --lora a --lora b`` with two DoRAs on the same weight is refused before anything
    is written, naming the second file and its magnitude key."""
    from ggufvideo.lora.bake import bake_sources

    q, dense = models
    p = pairs(_shapes(q))
    first, _ = dora_lora(_weights(dense), p, "kohya")
    second, _ = dora_lora(_weights(dense), p, "kohya", seed=1)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file(first, a)
    st.save_file(second, b)
    from ggufvideo.writer import SourceTensor

    sd = dense.state_dict()
    tensors = [SourceTensor(name=k, shape=tuple(v.shape), dtype=v.dtype, load=lambda v=v: v)
               for k, v in sd.items()]
    with pytest.raises(LoraError, match="one DoRA at a time") as info:
        bake_sources(tensors, [(a, 1.0), (b, 1.0)], ggufvideo.QuantPolicy.from_type("Q8_0"),
                     own_types=True)
    msg = str(info.value)
    assert "b.safetensors" in msg and "a.safetensors" in msg and ".dora_scale" in msg


def test_a_dora_on_a_model_without_values_names_the_file_and_key(tmp_path):
    """A model built on the meta device has no norms to take: a clear error, not a torch one."""
    with ggufvideo.empty_weights():
        model = nn.Sequential(nn.Linear(32, 16))
    sd = {"0.lora_down.weight": torch.ones(4, 32), "0.lora_up.weight": torch.ones(16, 4),
          "0.dora_scale": torch.ones(16, 1)}
    with pytest.raises(LoraError, match="meta device") as info:
        apply_lora(model, sd)
    assert "0.dora_scale" in str(info.value)
