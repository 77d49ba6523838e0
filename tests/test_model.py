"""load_model: meta-built models, lazy vs eager, key prefixes, strict reports, dtypes, devices."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T
from model_files import policy, tensor_bytes, write_gguf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ggufvideo import GGMLTensor, GGUFError, ModelLoadError, empty_weights, load_model
from ggufvideo.loader import resolve_device
from ggufvideo.model import assign_state_dict, parameter_bytes
from ggufvideo.ops import QuantConv3d, QuantEmbedding, QuantLayer, QuantLinear


class Tiny(nn.Module):
    """Every kind of thing a checkpoint fills: quantizable layers, 1-D params, a persistent buffer,
    and a non-persistent buffer no file holds."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 32)
        self.patch = nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 32))
        self.register_buffer("table", torch.arange(32.0), persistent=False)

    def forward(self, ids: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        h = self.out(self.norm(self.proj(self.embed(ids))))
        v = self.patch(video).flatten(2).transpose(1, 2)
        return torch.cat([h, v], dim=1) * self.scale + self.table


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 64, (2, 7), generator=g), torch.randn(2, 4, 1, 4, 4, generator=g).to(dtype)


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.norm.weight.normal_()
    return model


@pytest.fixture
def path(original, tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", original.state_dict(), policy(T.Q8_0))


def build_empty() -> Tiny:
    with empty_weights():
        return Tiny()


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers_real():
    model = build_empty()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.table.device.type == "cpu" and torch.equal(model.table, torch.arange(32.0))
    assert nn.Module.register_parameter.__name__ == "register_parameter"  # patch undone


def test_lazy_load_keeps_weights_quantized_and_matches_eager_bit_for_bit(path, original):
    lazy = load_model(build_empty(), path)
    eager = load_model(build_empty(), path, lazy=False)
    assert isinstance(lazy.proj, QuantLinear) and isinstance(lazy.patch, QuantConv3d)
    assert isinstance(lazy.embed, QuantEmbedding)
    for name in ("embed.weight", "proj.weight", "out.weight", "patch.weight"):
        p = lazy.get_parameter(name)
        assert isinstance(p, GGMLTensor) and p.qtype == T.Q8_0 and isinstance(p, nn.Parameter)
        assert not p.requires_grad
    assert type(lazy.proj.bias) is nn.Parameter and lazy.proj.bias.dtype == torch.float32
    assert not any(isinstance(m, QuantLayer) for m in eager.modules())
    assert all(type(p) is nn.Parameter for p in eager.parameters())
    out = lazy(*inputs())
    assert torch.equal(out, eager(*inputs()))
    assert torch.allclose(out, original(*inputs()), rtol=0, atol=0.05)


def test_lazy_resident_size_is_the_files_quantized_bytes(path):
    model = load_model(build_empty(), path)
    table = model.table.nbytes  # the one buffer no file holds
    assert parameter_bytes(model) - table == tensor_bytes(path)
    eager = load_model(build_empty(), path, lazy=False)
    assert parameter_bytes(eager) > 3 * tensor_bytes(path)  # float32 vs 8.5 bits a weight


def test_eager_weights_own_their_memory_and_stay_trainable(path):
    model = load_model(build_empty(), path, lazy=False)
    assert model.proj.weight.requires_grad
    with torch.no_grad():
        model.proj.weight.add_(1.0)  # does not touch the file's mapping
    again = load_model(build_empty(), path, lazy=False)
    assert not torch.equal(again.proj.weight, model.proj.weight)


def test_state_dict_returns_the_files_ggml_tensors(path):
    from ggufvideo import load_state_dict

    model = load_model(build_empty(), path)
    sd = model.state_dict()
    file = load_state_dict(path, lazy=True)
    for key in ("proj.weight", "patch.weight", "embed.weight"):
        assert isinstance(sd[key], GGMLTensor)
        assert torch.equal(sd[key].raw.flatten(), file[key].raw.flatten())
    assert set(sd) == set(file)


def test_dtype_sets_compute_dtype_and_plain_tensor_dtype(path):
    lazy = load_model(build_empty(), path, dtype="bfloat16")
    eager = load_model(build_empty(), path, lazy=False, dtype=torch.bfloat16)
    assert lazy.proj.weight.dtype == torch.bfloat16 and isinstance(lazy.proj.weight, GGMLTensor)
    assert lazy.proj.bias.dtype == torch.bfloat16 and lazy.scale.dtype == torch.bfloat16
    assert eager.proj.weight.dtype == torch.bfloat16
    ids, video = inputs(torch.bfloat16)
    assert torch.equal(lazy(ids, video), eager(ids, video))


def test_model_to_dtype_changes_compute_dtype_only(path):
    lazy = load_model(build_empty(), path)
    raw = lazy.proj.weight.raw
    lazy.to(torch.bfloat16)
    assert isinstance(lazy.proj.weight, GGMLTensor) and lazy.proj.weight.dtype == torch.bfloat16
    assert lazy.proj.weight.raw.data_ptr() == raw.data_ptr()  # same blocks, nothing decoded
    eager = load_model(build_empty(), path, lazy=False).to(torch.bfloat16)
    ids, video = inputs(torch.bfloat16)
    assert torch.equal(lazy(ids, video), eager(ids, video))


def test_model_with_real_weights_is_overwritten(path):
    torch.manual_seed(1)
    model = load_model(Tiny(), path)
    reference = load_model(build_empty(), path)
    assert torch.equal(model(*inputs()), reference(*inputs()))


def test_automatic_prefix_strip(original, tmp_path):
    p = write_gguf(tmp_path / "p.gguf", original.state_dict(), policy(T.Q8_0),
                   prefix="model.diffusion_model.")
    a = load_model(build_empty(), p)
    b = load_model(build_empty(), p, prefix="model.diffusion_model.")
    assert torch.equal(a(*inputs()), b(*inputs()))
    with pytest.raises(ModelLoadError, match="unexpected keys.*model.diffusion_model.proj.weight"):
        load_model(build_empty(), p, prefix="")  # stripping disabled


def test_automatic_prefix_strip_reports_keys_outside_the_prefix(original, tmp_path):
    sd = {**{"first_stage_model." + k: v for k, v in original.state_dict().items()},
          "cond_stage_model.emb.weight": torch.zeros(4, 32)}
    p = write_gguf(tmp_path / "p.gguf", sd, policy(T.Q8_0))
    with pytest.raises(ModelLoadError, match=r"unexpected keys .*cond_stage_model\.emb\.weight") as e:
        load_model(build_empty(), p)
    assert "first_stage_model." in str(e.value) and "missing" not in str(e.value)


def test_strict_names_missing_and_unexpected_keys(original, tmp_path):
    sd = dict(original.state_dict())
    del sd["out.bias"]
    sd["extra.weight"] = torch.zeros(2, 32)
    p = write_gguf(tmp_path / "m.gguf", sd, policy(T.Q8_0))
    with pytest.raises(ModelLoadError) as e:
        load_model(build_empty(), p)
    msg = str(e.value)
    assert "missing keys" in msg and "out.bias" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg and str(p) in msg
    assert isinstance(e.value, GGUFError)

    with pytest.warns(UserWarning, match="1 missing keys.*out.bias.*1 unexpected keys.*extra.weight"):
        model = load_model(build_empty(), p, strict=False)
    assert isinstance(model.proj.weight, GGMLTensor)
    assert model.out.bias.device.type == "meta"  # left as it was


def test_assign_state_dict_returns_incompatible_keys(original):
    sd = dict(original.state_dict())
    sd.pop("scale")
    sd["junk"] = torch.zeros(1)
    report = assign_state_dict(build_empty(), sd, strict=False)
    assert report.missing_keys == ["scale"] and report.unexpected_keys == ["junk"]
    assert report.meta_buffers == []


def test_shape_mismatch_names_the_key_and_changes_nothing(original, tmp_path):
    sd = dict(original.state_dict())
    sd["out.weight"] = torch.zeros(32, 32)
    p = write_gguf(tmp_path / "s.gguf", sd, policy(T.Q8_0))
    model = build_empty()
    with pytest.raises(ModelLoadError, match=r"tensor out\.weight: shape mismatch: the model "
                                             r"expects \[32, 64\], the file has \[32, 32\]"):
        load_model(model, p)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_fully_meta_model_names_buffers_no_file_holds(path):
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(ModelLoadError, match=r"meta device.*table.*empty_weights"):
        load_model(model, path)
    with torch.device("meta"):
        model = Tiny()
    with pytest.warns(UserWarning, match="1 buffers on meta"):
        load_model(model, path, strict=False)
    assert model.scale.device.type == "cpu"  # the persistent buffer came from the file


def test_f16_weights_of_quant_layers_stay_16_bit(original, tmp_path):
    p = write_gguf(tmp_path / "h.gguf", original.state_dict(), policy(T.F16))
    lazy = load_model(build_empty(), p)
    w = lazy.proj.weight
    assert isinstance(w, GGMLTensor) and w.qtype == T.F16 and w.dtype == torch.float32
    assert w.raw.nbytes == w.numel() * 2
    eager = load_model(build_empty(), p, lazy=False)
    assert torch.equal(lazy(*inputs()), eager(*inputs()))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(build_empty(), tmp_path / "nope.gguf")


class _Copies(TorchDispatchMode):
    """Counts the tensor copies (``aten._to_copy``) made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0)])
def test_a_device_named_with_or_without_index_moves_nothing_already_there(path, device):
    # tensors report "cpu" (and "cuda:0"): compared against the name as given, every tensor
    # would be "moved" to where it already is, a dispatch each (~30 ms for a 14B model)
    model = build_empty()
    with _Copies() as mode:
        load_model(model, path, device=device)
    assert mode.copies == 0
    assert model.proj.weight.device == torch.device("cpu")


def test_resolve_device_gives_the_device_tensors_report():
    assert resolve_device("cpu:0") == torch.device("cpu") == torch.empty(0, device="cpu:0").device
    assert resolve_device("meta") == torch.device("meta")
    if not torch.cuda.is_available():  # unreachable: given back as it was, for the caller to report
        assert resolve_device("cuda") == torch.device("cuda")


@pytest.mark.gpu
def test_gpu_load_to_cuda_without_index_copies_each_tensor_once(path):
    model = build_empty()
    with _Copies() as mode:
        load_model(model, path, device="cuda")
    assert model.proj.weight.device == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda") == model.proj.weight.device
    # the file's tensors go through the staged upload (its own copy calls, in its threads); the
    # one copy here is the buffer no file holds ("table"), following the model to the GPU
    assert mode.copies <= 1


@pytest.mark.gpu
def test_load_to_cuda_moves_raw_blocks_and_runs(path):
    lazy = load_model(build_empty(), path, device="cuda")
    assert lazy.proj.weight.raw.device.type == "cuda" and lazy.table.device.type == "cuda"
    eager = load_model(build_empty(), path, lazy=False, device="cuda")
    ids, video = (t.cuda() for t in inputs())
    assert torch.equal(lazy(ids, video), eager(ids, video))
    cpu = load_model(build_empty(), path).to("cuda")
    assert isinstance(cpu.proj.weight, GGMLTensor) and cpu.proj.weight.raw.is_cuda
    assert torch.equal(cpu(ids, video), eager(ids, video))


def test_loading_pauses_the_garbage_collector_and_restores_it(tmp_path, monkeypatch):
    """Full collections would find nothing to free among the objects a load makes, and cost in
    proportion to everything the process holds: load_model runs with the collector off and
    puts it back as it was, also when the load fails."""
    import gc

    import ggufvideo
    import ggufvideo.model as gm

    path = tmp_path / "m.gguf"
    ggufvideo.save_state_dict({"weight": torch.randn(4, 32)}, path)
    seen = []
    real = gm.assign_state_dict

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)

    monkeypatch.setattr(gm, "assign_state_dict", spy)
    assert gc.isenabled()
    ggufvideo.load_model(nn.Linear(32, 4, bias=False), path)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(ggufvideo.ModelLoadError):
        ggufvideo.load_model(nn.Linear(16, 4, bias=False), path)
    assert gc.isenabled()
    gc.disable()
    try:  # nested or already off: left off
        ggufvideo.load_model(nn.Linear(32, 4, bias=False), path)
        assert not gc.isenabled()
    finally:
        gc.enable()
