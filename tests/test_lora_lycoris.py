"""LyCORIS LoHa and LoKr: their deltas against peft's implementation of the same products, their
forms on a layer (a LoHa as one low-rank pair, a LoKr factor by factor), apply/remove/rescale on a
real model, bake-in, and the errors a malformed factor set gets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import CONFIG, quantized_wan, run_wan
from torch import nn

from ggufvideo import GGMLTensor, apply_lora, fuse_lora, quantize
from ggufvideo.errors import LoraError
from ggufvideo.lora import parse_lora
from ggufvideo.lora.lycoris import loha_pair, loha_weight, lokr_factors
from ggufvideo.lora.pieces import adapter_for
from ggufvideo.lora.targets import Piece
from ggufvideo.ops import KronAdapter, LoraAdapter, lora_adapters, swap_quant_layers

diffusers = pytest.importorskip("diffusers")
# peft's LoHa/LoKr layers are the reference for the products (peft is in the test extra)
from peft.tuners.loha.layer import make_weight as peft_loha  # noqa: E402
from peft.tuners.loha.layer import make_weight_cp as peft_loha_cp  # noqa: E402
from peft.tuners.lokr.layer import make_kron as peft_kron  # noqa: E402
from peft.tuners.lokr.layer import make_weight_cp as peft_lokr_cp  # noqa: E402


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _r(*shape: int, g: torch.Generator, s: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * s


def loha(out: int, inn: int, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hada_w1_a": _r(out, rank, g=g), "hada_w1_b": _r(rank, inn, g=g),
            "hada_w2_a": _r(out, rank, g=g), "hada_w2_b": _r(rank, inn, g=g)}


def loha_ref(f: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    if "hada_t1" in f:
        return peft_loha_cp(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"], f["hada_t2"],
                            f["hada_w2_a"], f["hada_w2_b"], scale=torch.tensor(scale))
    return peft_loha(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"],
                     scale=torch.tensor(scale))


def lokr_ref(f: dict[str, torch.Tensor], shape: tuple[int, ...], scale: float = 1.0
             ) -> torch.Tensor:
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = peft_lokr_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    return peft_kron(w1, w2, scale).reshape(shape)


# -- the products ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_loha_delta_and_its_low_rank_pair_equal_peft_s_product(seed):
    g = _g(seed)
    out, inn, rank = [(48, 80, 4), (16, 16, 1), (96, 40, 8), (8, 200, 3)][seed]
    f = loha(out, inn, rank, g)
    ref = loha_ref(f)
    assert torch.allclose(loha_weight(f), ref, rtol=1e-5, atol=1e-7)
    pair = loha_pair(f)
    assert pair is not None
    down, up = pair
    assert down.shape == (rank * rank, inn) and up.shape == (out, rank * rank)
    assert torch.allclose(up @ down, ref, rtol=1e-5, atol=1e-7)


def test_loha_tucker_conv_delta_equals_peft_s():
    g = _g(5)
    f = {"hada_t1": _r(3, 3, 3, 3, g=g), "hada_w1_a": _r(3, 16, g=g), "hada_w1_b": _r(3, 8, g=g),
         "hada_t2": _r(3, 3, 3, 3, g=g), "hada_w2_a": _r(3, 16, g=g), "hada_w2_b": _r(3, 8, g=g)}
    assert torch.allclose(loha_weight(f), loha_ref(f), rtol=1e-5, atol=1e-7)
    assert loha_pair(f) is None  # Tucker factors have no pair form: the layer gets the delta


@pytest.mark.parametrize("form", ["whole", "w2 factorised", "both factorised", "tucker conv",
                                  "factorised conv"])
def test_lokr_factors_give_peft_s_kronecker_product(form):
    g = _g(7)
    if form == "whole":
        f, shape = {"lokr_w1": _r(4, 2, g=g), "lokr_w2": _r(16, 24, g=g)}, (64, 48)
    elif form == "w2 factorised":
        f = {"lokr_w1": _r(4, 2, g=g), "lokr_w2_a": _r(16, 3, g=g), "lokr_w2_b": _r(3, 24, g=g)}
        shape = (64, 48)
    elif form == "both factorised":
        f = {"lokr_w1_a": _r(4, 2, g=g), "lokr_w1_b": _r(2, 2, g=g),
             "lokr_w2_a": _r(16, 3, g=g), "lokr_w2_b": _r(3, 24, g=g)}
        shape = (64, 48)
    elif form == "tucker conv":
        f = {"lokr_w1": _r(2, 2, g=g), "lokr_t2": _r(3, 3, 3, 3, g=g),
             "lokr_w2_a": _r(3, 8, g=g), "lokr_w2_b": _r(3, 4, g=g)}
        shape = (16, 8, 3, 3)
    else:
        f = {"lokr_w1": _r(2, 2, g=g), "lokr_w2_a": _r(8, 3, g=g), "lokr_w2_b": _r(3, 4 * 9, g=g)}
        shape = (16, 8, 3, 3)
    w1, w2 = lokr_factors(f)
    assert w1.dim() == w2.dim() == 2
    ours = KronAdapter(w1, w2, scale=0.7).delta_weight(shape)
    assert torch.allclose(ours, lokr_ref(f, shape, 0.7), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch", [(5,), (2, 7), (1, 3, 4)])
def test_kron_adapter_applies_the_product_without_forming_it(batch):
    g = _g(11)
    w1, w2 = _r(3, 4, g=g, s=1), _r(5, 6, g=g, s=1)
    a = KronAdapter(w1.double(), w2.double(), scale=-0.5)
    x = torch.randn(*batch, 24, generator=g, dtype=torch.float64)
    ref = x @ torch.kron(w1.double(), w2.double()).T * -0.5
    assert torch.allclose(a.delta(x), ref, rtol=1e-12, atol=1e-12)


def test_kron_adapter_on_a_conv_layer_is_the_conv_with_its_delta_weight():
    g = _g(12)
    layer = swap_quant_layers(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)))[0]
    w1, w2 = _r(2, 2, g=g), _r(8, 4 * 9, g=g)
    lora_adapters(layer).append(KronAdapter(w1, w2, scale=2.0))
    x = torch.randn(1, 8, 6, 6, generator=g)
    dense = (torch.kron(w1, w2) * 2.0).reshape(16, 8, 3, 3)
    with torch.no_grad():
        ref = F.conv2d(x, layer.weight + dense, layer.bias, padding=1)
        assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)


# -- scales -------------------------------------------------------------------------------------
def test_scales_follow_lycoris():
    g = _g(13)
    f = loha(8, 8, 4, g)
    (e,) = parse_lora({f"a.{k}": v for k, v in f.items()} | {"a.alpha": torch.tensor(2.0)})
    assert e.kind == "loha" and e.rank == 4 and e.scale == 0.5
    whole = {"a.lokr_w1": _r(2, 2, g=g), "a.lokr_w2": _r(4, 4, g=g), "a.alpha": torch.tensor(8.0)}
    (e,) = parse_lora(whole)
    assert e.kind == "lokr" and e.scale == 1.0  # both factors whole: the alpha is not used
    split = {"a.lokr_w1": _r(2, 2, g=g), "a.lokr_w2_a": _r(4, 2, g=g),
             "a.lokr_w2_b": _r(2, 4, g=g), "a.alpha": torch.tensor(8.0)}
    (e,) = parse_lora(split)
    assert e.scale == 4.0  # alpha / rank of the factorised factor
    (e,) = parse_lora({k: v for k, v in split.items() if k != "a.alpha"})
    assert e.scale == 1.0


def test_lycoris_norm_keys_are_full_deltas():
    lf = parse_lora({"blocks.0.norm3.w_norm": torch.ones(8), "blocks.0.norm3.b_norm": torch.ones(8)})
    (e,) = lf
    assert e.kind == "diff" and e.diff is not None and e.diff_b is not None


# -- on a real model ------------------------------------------------------------------------------
#: (SimpleTuner's LyCORIS name, kohya's original name, diffusers weight, its shape)
LAYERS = [("lycoris_blocks_0_attn1_to_q", "lora_unet_blocks_0_self_attn_q",
           "blocks.0.attn1.to_q.weight", (256, 256)),
          ("lycoris_blocks_1_ffn_net_0_proj", "lora_unet_blocks_1_ffn_0",
           "blocks.1.ffn.net.0.proj.weight", (512, 256))]


def _lokr_file(g):
    sd, deltas = {}, {}
    for name, _, key, (out, inn) in LAYERS:
        f = {"lokr_w1": _r(4, 4, g=g, s=1), "lokr_w2_a": _r(out // 4, 8, g=g),
             "lokr_w2_b": _r(8, inn // 4, g=g)}
        sd |= {f"{name}.{k}": v for k, v in f.items()} | {f"{name}.alpha": torch.tensor(4.0)}
        deltas[key] = lokr_ref(f, (out, inn), 4.0 / 8)
    return sd, deltas


def _loha_file(g):
    sd, deltas = {}, {}
    for _, name, key, (out, inn) in LAYERS:
        f = loha(out, inn, 4, g)
        sd |= {f"{name}.{k}": v for k, v in f.items()} | {f"{name}.alpha": torch.tensor(2.0)}
        deltas[key] = loha_ref(f, 0.5)
    return sd, deltas


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_applied_unmerged_matches_the_merged_reference_and_comes_off_exactly(kind):
    q, dense = quantized_wan()
    sd, deltas = (_lokr_file if kind == "lokr" else _loha_file)(_g(21))
    base = run_wan(q)
    handle = apply_lora(q, sd, scale=0.8)
    try:
        assert sorted(handle.targets) == sorted(deltas)
        layer = q.get_submodule("blocks.0.attn1.to_q")
        want = KronAdapter if kind == "lokr" else LoraAdapter
        assert all(isinstance(a, want) for a in lora_adapters(layer))
        if kind == "loha":  # one rank-16 pair, not a dense delta
            assert lora_adapters(layer)[0].down.shape == (16, 256)
        ref = copy.deepcopy(dense)
        for k, d in deltas.items():
            ref.state_dict(keep_vars=True)[k].data += 0.8 * d
        out = run_wan(q)
        assert not torch.allclose(out, base, atol=1e-4)
        assert torch.allclose(out, run_wan(ref), rtol=1e-4, atol=1e-5)
        handle.set_scale(0.0)
        assert torch.allclose(run_wan(q), base, atol=1e-6)
    finally:
        handle.remove()
    assert torch.equal(run_wan(q), base)
    assert isinstance(q.get_submodule("blocks.0.attn1.to_q").weight, GGMLTensor)


def test_fuse_lora_bakes_a_lokr_with_the_exact_quantizer():
    q, _ = quantized_wan()
    sd, deltas = _lokr_file(_g(22))
    before = {k: q.state_dict(keep_vars=True)[k] for k in deltas}
    assert sorted(fuse_lora(q, sd, scale=0.5)) == sorted(deltas)
    for k, d in deltas.items():
        new = q.state_dict(keep_vars=True)[k]
        expected = quantize(before[k].dequantize(torch.float32) + 0.5 * d, "Q8_0")
        assert torch.equal(new.raw.reshape(expected.shape), expected)


def test_a_lokr_on_part_of_a_fused_weight_takes_whole_kronecker_rows_or_its_dense_rows():
    g = _g(23)
    w1, w2 = _r(6, 2, g=g), _r(4, 8, g=g)  # kron: (24, 16), blocks of 4 rows
    (e,) = parse_lora({"qkv.lokr_w1": w1, "qkv.lokr_w2": w2})
    full = torch.kron(w1, w2)
    aligned = adapter_for(Piece(e, "to_k.weight", (0, 8), (8, 16), 8, 24), (8, 16), "f")
    assert isinstance(aligned, KronAdapter)
    assert torch.allclose(aligned.delta_weight((8, 16)), full[8:16])
    odd = adapter_for(Piece(e, "to_k.weight", (0, 6), (6, 12), 6, 24), (6, 16), "f")
    assert isinstance(odd, LoraAdapter) and odd.down is None
    assert torch.allclose(odd.delta_weight((6, 16)), full[6:12])
    padded = adapter_for(Piece(e, "mlp.weight", (2, 10), (8, 16), 12, 24), (12, 16), "f")
    assert torch.allclose(padded.delta_weight((12, 16))[2:10], full[8:16])
    assert not padded.delta_weight((12, 16))[:2].any()


def test_kron_adapters_ride_beside_the_fused_low_rank_path(monkeypatch):
    from ggufvideo import kernels, ops

    g = _g(24)
    layer = swap_quant_layers(nn.Sequential(nn.Linear(256, 64)))[0]
    w = layer.weight.detach()
    layer._parameters["weight"] = nn.Parameter(
        GGMLTensor(quantize(w, "Q8_0"), "Q8_0", (64, 256), torch.float32), requires_grad=False)
    pair = LoraAdapter(up=_r(64, 4, g=g), down=_r(4, 256, g=g), scale=0.5)
    kron = KronAdapter(_r(4, 8, g=g), _r(16, 32, g=g), scale=2.0)
    lora_adapters(layer).extend([pair, kron])
    x = torch.randn(2, 70, 256, generator=g)
    with torch.no_grad():
        ref = layer(x)
        monkeypatch.setattr(ops, "_gpu_kernels", lambda w: kernels)
        fused = layer(x)
    assert "_lora_pack" in layer.__dict__  # the pair took the fused path
    assert torch.allclose(fused, ref, rtol=1e-5, atol=2e-3)
    dense = layer.weight.dequantize() + 0.5 * pair.up @ pair.down + kron.delta_weight((64, 256))
    assert torch.allclose(ref, x @ dense.T + layer.bias, rtol=1e-4, atol=1e-4)


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sd, message", [
    ({"a.lokr_w1": torch.ones(2, 2), "a.lokr_w2": torch.ones(2, 2),
      "a.lokr_w2_a": torch.ones(2, 1)}, "both lokr_w2 and its factors"),
    ({"a.lokr_w1": torch.ones(2, 2, 1), "a.lokr_w2": torch.ones(2, 2)}, "must be a matrix"),
    ({"a.lokr_w1": torch.ones(2, 2), "a.lokr_w2_a": torch.ones(4, 2),
      "a.lokr_w2_b": torch.ones(3, 4)}, "do not agree on their rank"),
    ({"a.lokr_w1": torch.ones(2, 2), "a.lokr_w2_a": torch.ones(2, 4), "a.lokr_w2_b": torch.ones(2, 4),
      "a.lokr_w2": torch.ones(4, 4), "a.lokr_t2": torch.ones(2, 2, 1, 1)}, "both lokr_w2"),
    ({"a.hada_w1_a": torch.ones(4, 2), "a.hada_w1_b": torch.ones(2, 4),
      "a.hada_w2_a": torch.ones(4, 2), "a.hada_w2_b": torch.ones(2, 4),
      "a.hada_t1": torch.ones(2, 2, 1, 1)}, "without its hada_t2"),
    ({"a.hada_w1_a": torch.ones(4, 2), "a.hada_w1_b": torch.ones(2, 4),
      "a.hada_w2_a": torch.ones(4, 2), "a.hada_w2_b": torch.ones(2, 4),
      "a.lora_down.weight": torch.ones(2, 4), "a.lora_up.weight": torch.ones(4, 2)}, "mixes"),
    ({"a.lokr_w1": torch.ones(2, 2), "a.lokr_t2": torch.ones(3, 3, 3, 3),
      "a.lokr_w2_a": torch.ones(2, 4), "a.lokr_w2_b": torch.ones(2, 4)}, "Tucker core"),
    ({"a.hada_w1_a": torch.ones(2, 4), "a.hada_w1_b": torch.ones(2, 4),
      "a.hada_w2_a": torch.ones(2, 4), "a.hada_w2_b": torch.ones(2, 4),
      "a.hada_t1": torch.ones(2), "a.hada_t2": torch.ones(2, 2, 1, 1)}, "Tucker core"),
])
def test_malformed_factor_sets_name_the_file_and_key(sd, message):
    with pytest.raises(LoraError, match=message) as info:
        parse_lora(sd, source="style.safetensors")
    assert "style.safetensors" in str(info.value) and "a." in str(info.value)


@pytest.mark.parametrize("sd", [
    {"lin.lokr_w1": torch.ones(3, 2), "lin.lokr_w2": torch.ones(4, 4)},  # 12 x 8, not 16 x 8
    {"lin.hada_w1_a": torch.ones(16, 2), "lin.hada_w1_b": torch.ones(2, 8),
     "lin.hada_w2_a": torch.ones(8, 2), "lin.hada_w2_b": torch.ones(2, 8)},  # products differ
])
def test_factors_that_do_not_fit_the_layer_are_refused_before_anything_changes(sd):
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(8, 16))
    x = torch.randn(3, 8)
    base = model(x)
    with pytest.raises(LoraError, match="does not fit the weight lin.weight") as info:
        apply_lora(model, sd, strict=True)
    assert "lin." in str(info.value)
    assert type(model.lin) is nn.Linear and torch.equal(model(x), base)


@pytest.mark.parametrize("kind", ["loha tucker", "lokr tucker"])
def test_tucker_factors_on_a_conv_layer_match_peft_s_delta(kind):
    g = _g(25)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(8, 16, 3, padding=1))
    if kind == "loha tucker":
        f = {"hada_t1": _r(3, 3, 3, 3, g=g), "hada_w1_a": _r(3, 16, g=g),
             "hada_w1_b": _r(3, 8, g=g), "hada_t2": _r(3, 3, 3, 3, g=g),
             "hada_w2_a": _r(3, 16, g=g), "hada_w2_b": _r(3, 8, g=g)}
        delta = loha_ref(f, 2.0 / 3)
    else:
        f = {"lokr_w1": _r(2, 2, g=g, s=1), "lokr_t2": _r(3, 3, 3, 3, g=g),
             "lokr_w2_a": _r(3, 8, g=g), "lokr_w2_b": _r(3, 4, g=g)}
        delta = lokr_ref(f, (16, 8, 3, 3), 2.0 / 3)
    sd = {f"conv.{k}": v for k, v in f.items()} | {"conv.alpha": torch.tensor(2.0)}
    x = torch.randn(1, 8, 5, 5, generator=g)
    with torch.no_grad():
        ref = F.conv2d(x, model.conv.weight + delta, model.conv.bias, padding=1)
        handle = apply_lora(model, sd)
        assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-5)
        handle.remove()
        assert type(model.conv) is nn.Conv2d


@pytest.mark.gpu
def test_a_lokr_beside_a_fused_lora_pair_on_cuda_matches_the_reference_path():
    from ggufvideo import kernels, ops

    if not torch.cuda.is_available() or not kernels.is_available("cuda", "Q4_K"):
        pytest.skip("needs CUDA and triton")
    g = _g(26)
    layer = swap_quant_layers(nn.Sequential(nn.Linear(512, 384)))[0]
    w = layer.weight.detach()
    layer._parameters["weight"] = nn.Parameter(
        GGMLTensor(quantize(w, "Q4_K"), "Q4_K", (384, 512), torch.float32), requires_grad=False)
    layer = layer.to(torch.bfloat16).cuda()
    lora_adapters(layer).extend([
        LoraAdapter(up=_r(384, 16, g=g), down=_r(16, 512, g=g), scale=0.8),
        KronAdapter(_r(8, 16, g=g, s=1), _r(48, 32, g=g), scale=0.5)])
    x = torch.randn(300, 512, generator=g).to("cuda", torch.bfloat16)
    with torch.no_grad():
        fused = layer(x)
        assert "_lora_pack" in layer.__dict__
        ops.set_lora_fusion(False)
        try:
            ref = layer(x)
        finally:
            ops.set_lora_fusion(None)
    assert torch.allclose(fused.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_convert_bakes_a_simpletuner_lokr_into_an_original_named_gguf(tmp_path):
    import ggufvideo
    from ggufvideo import GGUFFile, convert, dequantize
    from ggufvideo.models import get_family
    from ggufvideo.models.tensors import TensorOps

    torch.manual_seed(0)
    sd = diffusers.WanTransformer3DModel(**CONFIG).state_dict()
    orig = get_family("wan").convert(sd, "diffusers", "original", TensorOps())
    src, dst = tmp_path / "wan.gguf", tmp_path / "baked.gguf"
    ggufvideo.save_state_dict(orig, src, policy=ggufvideo.QuantPolicy.from_type("Q8_0"))
    lora, deltas = _lokr_file(_g(27))
    summary = convert(src, dst, qtype=None, loras=[(lora, 0.7)])
    names = {"blocks.0.attn1.to_q.weight": "blocks.0.self_attn.q.weight",
             "blocks.1.ffn.net.0.proj.weight": "blocks.1.ffn.0.weight"}
    assert sorted(summary.lora_changed) == sorted(names.values())
    with GGUFFile(src) as a, GGUFFile(dst) as b:
        for key, name in names.items():
            info = a.tensors[name]
            w = dequantize(a.tensor_data(info), info.qtype).reshape(deltas[key].shape)
            expected = quantize(w + 0.7 * deltas[key], info.qtype)
            assert torch.equal(b.tensor_data(b.tensors[name]).reshape(expected.shape), expected)
