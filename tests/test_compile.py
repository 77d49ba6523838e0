"""torch.compile(fullgraph=True) through quant-aware layers: no graph breaks, no recompiles, and
the compiled output matches eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from model_files import policy, write_gguf
from torch import nn

from ggufvideo import GGMLTensor, empty_weights, load_model


class CausalConv3d(nn.Conv3d):
    """diffusers' WanCausalConv3d in miniature: own forward, then super().forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1, 2, 0)))


class FP32LayerNorm(nn.LayerNorm):
    """diffusers' FP32LayerNorm in miniature: uses self.weight itself (the generic fallback)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class Mixed(nn.Module):
    """Every path a weight can take: quant linear, quant conv under a subclass forward, embedding
    rows, a subclass that reads its weight itself, and a bare quantized parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 256)
        self.proj = nn.Linear(256, 256)
        self.norm = FP32LayerNorm(256)
        self.conv = CausalConv3d(8, 8, 3)
        self.table = nn.Parameter(torch.randn(4, 256))

    def forward(self, ids: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.proj(self.embed(ids))) + self.table.sum(0)
        return h, self.conv(video)


def _qtype(name: str, t: torch.Tensor) -> T:
    if name == "proj.weight":
        return T.Q4_K
    if name in ("norm.weight", "norm.bias"):  # 1-D, but quantized here to reach the fallback
        return T.Q8_0
    return policy(T.Q8_0)(name, t)


def test_compiled_quant_model_matches_eager_without_graph_breaks_or_recompiles(tmp_path):
    torch.manual_seed(0)
    path = write_gguf(tmp_path / "m.gguf", Mixed().state_dict(), _qtype)
    with empty_weights():
        model = Mixed()
    load_model(model, path)
    assert all(isinstance(model.get_parameter(n), GGMLTensor)
               for n in ("embed.weight", "proj.weight", "norm.weight", "conv.weight", "table"))
    ids = torch.randint(0, 100, (2, 5))
    video = torch.randn(1, 8, 2, 4, 4)
    with torch.no_grad():
        expected = model(ids, video)
        compiled = torch.compile(model, fullgraph=True)  # inductor; fullgraph: any break raises
        got = compiled(ids, video)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(ids, video)
    for e, g, a in zip(expected, got, again):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert torch.equal(g, a)


def test_wan_transformer_traces_whole_with_quantized_weights(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                  in_channels=16, out_channels=16, text_dim=128, freq_dim=256, ffn_dim=256,
                  num_layers=1, rope_max_seq_len=32)
    torch.manual_seed(0)
    path = write_gguf(tmp_path / "wan.gguf", diffusers.WanTransformer3DModel(**config).state_dict(),
                      policy(T.Q8_0))
    with empty_weights():
        model = diffusers.WanTransformer3DModel(**config).eval()
    load_model(model, path)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([500]),
            torch.randn(1, 8, 128, generator=g))
    with torch.no_grad():
        expected = model(*args, return_dict=False)[0]
        # aot_eager: dynamo + AOT autograd (where the tensor subclass is desugared) without
        # inductor's code generation, which would take minutes on CI for this model.
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(*args, return_dict=False)[0]
    assert torch.equal(got, expected)
