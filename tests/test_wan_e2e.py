"""End to end on real architectures: diffusers' Wan transformer and Wan VAE, tiny configs.

For each type the fp32 model's weights are written to GGUF, loaded lazily into a model built without
weights, and run. Two properties:

* exactness: the lazy model's output is bit-identical to the same model loaded eagerly
  (``lazy=False``, weights decoded once up front) at the same compute dtype;
* accuracy: the output's relative error against the fp32 original is within a bound derived from
  the type's rounding step.

Deriving the bounds. diffusers initialises these layers with kaiming-uniform weights, so a block of
weights is roughly uniform on [-a, a] (RMS a/sqrt(3)) and its absmax is close to a. Rounding to a step
s leaves an RMS error s/sqrt(12). The relative RMS error of the weights is then
``(s/sqrt(12)) / (a/sqrt(3)) = s / (2a)``:

====== ================================================ ==========
type   step s                                           s / (2a)
====== ================================================ ==========
F16    2^-10 x the value's magnitude (11-bit mantissa)  <= 2^-11
Q8_0   a/127 (symmetric, 8 bits)                        1/254
Q6_K   a/32 (symmetric, 6 bits)                         1/64
Q5_K   2a/31 (min + scale, 5 bits)                      1/31
Q4_K   2a/15 (min + scale, 4 bits)                      1/15
Q4_0   a/8 (symmetric, 4 bits)                          1/16
====== ================================================ ==========

The measured weight error must stay within 1.25x that estimate (block maxima fall a little short of
a; the K-quants' scale search gains a little). Errors of independent layers add in quadrature through
the residual stream and the norms rescale it, so the output's relative error is the weight error
times a gain that grows with the depth of the path. The gains measured with these seeds (printed
by ``pytest -s``) are at most 1.5 for the transformer, 2.4 for the VAE encoder and 4.0 for the VAE
decoder; ``OUTPUT_GAIN`` allows about 25% more.
"""

from __future__ import annotations

import math

import pytest
import torch
from gguf import GGMLQuantizationType as T
from model_files import policy, tensor_bytes, write_gguf

import ggufvideo
from ggufvideo import GGMLTensor, empty_weights, load_model
from ggufvideo.model import parameter_bytes
from ggufvideo.ops import QuantConv3d, QuantLayer, QuantLinear

diffusers = pytest.importorskip("diffusers")

TYPES = [T.F16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0]
#: relative RMS weight error s/(2a) of each type (see the module docstring)
WEIGHT_ERROR = {T.F16: 2**-11, T.Q8_0: 1 / 254, T.Q6_K: 1 / 64, T.Q5_K: 1 / 31, T.Q4_K: 1 / 15,
                T.Q4_0: 1 / 16}
OUTPUT_GAIN = {"transformer": 2.0, "vae_encoder": 3.0, "vae_decoder": 5.0}

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128,
                   in_channels=16, out_channels=16, text_dim=256, freq_dim=256, ffn_dim=512,
                   num_layers=2, rope_max_seq_len=32)
VAE = dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _weight_error(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Relative RMS error over every quantized weight of a lazily loaded model."""
    err = ref = 0.0
    for name, p in model.named_parameters():
        if isinstance(p, GGMLTensor):
            w = reference[name].double()
            err += float((p.dequantize(torch.float32).double() - w).square().sum())
            ref += float(w.square().sum())
    return math.sqrt(err / ref)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([500]),
              torch.randn(1, 8, 256, generator=g))
    with torch.no_grad():
        out = model(*inputs, return_dict=False)[0]
    return model.state_dict(), inputs, out


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**VAE).eval()
    video = torch.randn(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.encode(video).latent_dist.mode()
    return model.state_dict(), video, out


def _transformer_forward(model, inputs, dtype=torch.float32):
    x, t, ctx = inputs
    with torch.no_grad():
        return model(x.to(dtype), t, ctx.to(dtype), return_dict=False)[0]


def _vae_encode(model, video, dtype=torch.float32):
    with torch.no_grad():
        return model.encode(video.to(dtype)).latent_dist.mode()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_wan_transformer_lazy_matches_eager_and_fp32_within_bound(qtype, transformer, tmp_path):
    sd, inputs, ref = transformer
    # Real files carry ComfyUI's key prefix: load_model strips it on its own.
    path = write_gguf(tmp_path / "wan.gguf", sd, policy(qtype), prefix="model.diffusion_model.")
    with empty_weights():
        lazy = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
        eager = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    load_model(lazy, path)
    load_model(eager, path, lazy=False)

    if qtype != T.F16:
        assert isinstance(lazy.patch_embedding, QuantConv3d)
        assert isinstance(lazy.patch_embedding.weight, GGMLTensor)  # [256, 16, 1, 2, 2], quantized
        assert isinstance(lazy.blocks[0].attn1.to_q, QuantLinear)
        assert isinstance(lazy.blocks[0].attn1.to_q.weight, GGMLTensor)
    assert not any(isinstance(m, QuantLayer) for m in eager.modules())
    assert not any(isinstance(p, GGMLTensor) for p in eager.parameters())
    # resident parameters: the file's bytes, plus the rotary tables no file holds (and, for F16,
    # the scale_shift_tables that diffusers' own code uses at the model's dtype, float32)
    rope = sum(b.nbytes for b in lazy.buffers())
    assert tensor_bytes(path) <= parameter_bytes(lazy) - rope <= 1.02 * tensor_bytes(path)

    out = _transformer_forward(lazy, inputs)
    assert torch.equal(out, _transformer_forward(eager, inputs))
    w_err = _weight_error(lazy, sd)
    rel = _rel(out, ref)
    print(f"\nWan transformer {qtype.name}: weight error {w_err:.3e}, output error {rel:.3e}")
    assert w_err <= 1.25 * WEIGHT_ERROR[qtype]
    assert rel <= OUTPUT_GAIN["transformer"] * WEIGHT_ERROR[qtype]


def test_wan_transformer_bf16_lazy_is_bit_identical_to_eager(transformer, tmp_path):
    sd, inputs, ref = transformer
    path = write_gguf(tmp_path / "wan.gguf", sd, policy(T.Q4_K))
    with empty_weights():
        lazy = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
        eager = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    load_model(lazy, path, dtype=torch.bfloat16)
    load_model(eager, path, lazy=False, dtype=torch.bfloat16)
    assert lazy.blocks[0].ffn.net[2].weight.dtype == torch.bfloat16  # compute dtype
    out = _transformer_forward(lazy, inputs, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _transformer_forward(eager, inputs, torch.bfloat16))
    assert _rel(out, ref) < 0.2


def test_wan_transformer_built_fully_on_meta_recovers_rotary_buffers(transformer, tmp_path):
    sd, inputs, _ = transformer
    path = write_gguf(tmp_path / "wan.gguf", sd, policy(T.Q8_0))
    with empty_weights():
        reference = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**TRANSFORMER).eval()
    assert model.rope.freqs_cos.device.type == "meta"  # non-persistent: no file holds it
    load_model(model, path)
    load_model(reference, path)
    assert torch.equal(model.rope.freqs_cos, reference.rope.freqs_cos)
    assert torch.equal(_transformer_forward(model, inputs), _transformer_forward(reference, inputs))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_wan_vae_quantized_conv3d_lazy_matches_eager_and_fp32_within_bound(qtype, vae, tmp_path):
    sd, video, ref = vae
    path = write_gguf(tmp_path / "vae.gguf", sd, policy(qtype))
    with empty_weights():
        lazy = diffusers.AutoencoderKLWan(**VAE).eval()
        eager = diffusers.AutoencoderKLWan(**VAE).eval()
    load_model(lazy, path)
    load_model(eager, path, lazy=False)

    conv = lazy.encoder.down_blocks[0].conv1  # WanCausalConv3d, 3x3x3
    assert isinstance(conv, diffusers.models.autoencoders.autoencoder_kl_wan.WanCausalConv3d)
    assert isinstance(conv, QuantConv3d)
    if qtype != T.F16:
        assert isinstance(conv.weight, GGMLTensor) and conv.weight.shape == (16, 16, 3, 3, 3)

    out = _vae_encode(lazy, video)
    assert torch.equal(out, _vae_encode(eager, video))
    w_err = _weight_error(lazy, sd)
    rel = _rel(out, ref)
    print(f"\nWan VAE encoder {qtype.name}: weight error {w_err:.3e}, output error {rel:.3e}")
    assert w_err <= 1.25 * WEIGHT_ERROR[qtype]
    assert rel <= OUTPUT_GAIN["vae_encoder"] * WEIGHT_ERROR[qtype]


def test_wan_vae_decoder_runs_quantized(vae, tmp_path):
    sd, _, _ = vae
    path = write_gguf(tmp_path / "vae.gguf", sd, policy(T.Q4_K))
    with empty_weights():
        lazy = diffusers.AutoencoderKLWan(**VAE).eval()
    reference = diffusers.AutoencoderKLWan(**VAE).eval()
    reference.load_state_dict(sd)
    load_model(lazy, path)
    z = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = lazy.decode(z).sample
        ref = reference.decode(z).sample
    assert out.shape == (1, 3, 5, 16, 16)
    rel = _rel(out, ref)
    print(f"\nWan VAE decoder Q4_K: output error {rel:.3e}")
    assert rel <= OUTPUT_GAIN["vae_decoder"] * WEIGHT_ERROR[T.Q4_K]


def test_ggufvideo_exports_load_model():
    assert ggufvideo.load_model is load_model
