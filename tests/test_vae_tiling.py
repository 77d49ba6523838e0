"""A quantized Wan VAE (Q8_0 Conv3d weights kept as raw blocks) under diffusers' tiling and slicing.

Tiled decoding is not the untiled decode (tiles are blended at their seams); what must hold is
that the quantized layers do not change that: the quantized VAE tiled equals the same weights
decoded to float, tiled the same way, and its tiled-vs-untiled difference is the float model's.
The GPU memory measurement is ``benchmarks/gpu_vae.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

import ggufvideo  # noqa: E402
from ggufvideo import GGMLTensor  # noqa: E402

TILES = dict(tile_sample_min_height=48, tile_sample_min_width=48, tile_sample_stride_height=32,
             tile_sample_stride_width=32)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=32, z_dim=16).eval()
    path = str(tmp_path_factory.mktemp("vae") / "vae-Q8_0.gguf")
    ggufvideo.save_state_dict(vae.state_dict(), path, qtype="Q8_0")
    quant = ggufvideo.from_gguf(path, dtype="float32")
    plain = ggufvideo.from_gguf(path, dtype="float32", lazy=False)  # same weights, decoded
    return quant, plain


def _decode(vae, z, *, tiling=False, slicing=False):
    vae.disable_tiling()
    vae.disable_slicing()
    if tiling:
        vae.enable_tiling(**TILES)
    if slicing:
        vae.enable_slicing()
    with torch.no_grad():
        return vae.decode(z).sample


def test_the_conv3d_weights_are_quantized(vaes):
    quant, plain = vaes
    convs = [m for m in quant.modules() if isinstance(m, torch.nn.Conv3d)]
    big = [m for m in convs if m.kernel_size == (3, 3, 3) and m.in_channels >= 32]
    assert big and all(isinstance(m.weight, GGMLTensor) for m in big)
    assert isinstance(quant.decoder.up_blocks[0].resnets[0].conv1.weight, GGMLTensor)
    assert not any(isinstance(p, GGMLTensor) for p in plain.parameters())


def test_tiled_decode_of_the_quantized_vae(vaes):
    quant, plain = vaes
    z = torch.randn(1, 16, 2, 10, 10, generator=torch.Generator().manual_seed(1))
    q_full = _decode(quant, z)
    q_tiled = _decode(quant, z, tiling=True)
    f_full = _decode(plain, z)
    f_tiled = _decode(plain, z, tiling=True)
    assert q_tiled.shape == q_full.shape == (1, 3, 5, 80, 80)
    assert torch.isfinite(q_tiled).all()
    # the quantized layers under tiling compute what the decoded weights compute
    torch.testing.assert_close(q_tiled, f_tiled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q_full, f_full, rtol=1e-4, atol=1e-4)
    # and tiling's own (seam) error is the same with and without quantized layers
    torch.testing.assert_close(q_tiled - q_full, f_tiled - f_full, rtol=1e-4, atol=1e-4)
    assert (q_tiled - q_full).abs().mean() < (q_full.abs().mean())


def test_sliced_decode_of_the_quantized_vae_matches_unsliced(vaes):
    quant, _ = vaes
    z = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_decode(quant, z, slicing=True), _decode(quant, z),
                               rtol=1e-5, atol=1e-5)
    both = _decode(quant, z, slicing=True, tiling=True)
    assert both.shape == (2, 3, 1, 64, 64) and torch.isfinite(both).all()
