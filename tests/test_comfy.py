"""The ComfyUI adapter (ggufvideo.comfy), tested with ComfyUI absent.

ComfyUI's layer classes and model patcher are stood in for by small classes that follow the same
protocol (``comfy_cast_weights``/``weight_function``/``forward_comfy_cast_weights``,
``patches``/``backup``/``patch_weight_to_device``); the few tests that need ComfyUI itself skip
without it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ggufvideo import GGMLTensor, GGUFError
from ggufvideo.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes, paths
from ggufvideo.comfy.layers import (
    comfy_quant_class,
    fetch_weight,
    quantize_module_classes,
    raw_state_bytes,
)
from ggufvideo.comfy.loading import ComfyLoadError, chosen_dtype, precision_dtype
from ggufvideo.comfy.patcher import Backup, DeferredPatch, make_quant_patcher
from ggufvideo.loader import resolve_dtype

REPO = Path(__file__).resolve().parents[1]
REGISTRATION = REPO / "custom_nodes" / "ComfyUI-ggufvideo" / "__init__.py"


def quantized(x: torch.Tensor, qtype: str = "Q8_0") -> GGMLTensor:
    """``x`` quantized by gguf-py (rows along the last dim), as a GGMLTensor of x's shape."""
    q = gguf.GGMLQuantizationType[qtype]
    flat = x.detach().float().reshape(-1, x.shape[-1] if x.shape[-1] % 32 == 0 else 32).numpy()
    raw = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(flat, q)))
    return GGMLTensor(raw, q, x.shape)


# -- stand-ins for ComfyUI's layer protocol (comfy.ops.disable_weight_init) ------------------------
class CastOp:
    comfy_cast_weights = False
    weight_function: list = []
    bias_function: list = []


class FakeLinear(nn.Linear, CastOp):
    def reset_parameters(self) -> None:
        return None

    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights or self.weight_function or self.bias_function:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


class FakeConv3d(nn.Conv3d, CastOp):
    def reset_parameters(self) -> None:
        return None

    def _conv_forward(self, input, weight, bias, autopad=None):
        if autopad == "causal_zero":
            weight = weight[:, :, -input.shape[2]:, :, :]
        return super()._conv_forward(input, weight, bias)

    def forward_comfy_cast_weights(self, input, autopad=None):
        return self._conv_forward(input, self.weight, self.bias, autopad=autopad)

    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights or self.weight_function or "autopad" in kwargs:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


class FakeCausalConv3d(FakeConv3d):
    """Like the Wan VAE's: its own forward pads in time, then calls super().forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x):
        if x.shape[2] == 1:
            return super().forward(x, autopad="causal_zero")
        x = F.pad(x, (0, 0, 0, 0, self._pad, 0))
        return super().forward(x)


class FakeRMSNorm(nn.RMSNorm, CastOp):
    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


class FakeEmbedding(nn.Embedding, CastOp):
    def forward(self, *args, **kwargs):
        if self.comfy_cast_weights:
            return self.forward_comfy_cast_weights(*args, **kwargs)
        return super().forward(*args, **kwargs)


# -- import hygiene -------------------------------------------------------------------------------
def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def test_import_ggufvideo_never_imports_the_comfy_adapter():
    out = _run("import sys, ggufvideo; print(sorted(m for m in sys.modules if 'comfy' in m))")
    assert out == "[]"


def test_importing_the_adapter_imports_neither_comfyui_nor_the_loaders():
    out = _run("import sys, ggufvideo.comfy; "
               "print(sorted(m for m in sys.modules if 'comfy' in m or m == 'folder_paths'))")
    assert out == "['ggufvideo.comfy', 'ggufvideo.comfy.nodes', 'ggufvideo.comfy.paths']"


# -- node mappings and the registration folder ----------------------------------------------------
def test_node_mappings_name_every_node_with_a_display_name():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == {
        "GGUFVideoModelLoader", "GGUFVideoVAELoader", "GGUFVideoTextEncoderLoader",
        "GGUFVideoInspect"}
    for cls in NODE_CLASS_MAPPINGS.values():
        assert callable(cls.INPUT_TYPES)
        assert callable(getattr(cls(), cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.CATEGORY == "ggufvideo"
    assert NODE_CLASS_MAPPINGS["GGUFVideoModelLoader"].RETURN_TYPES == ("MODEL",)
    assert NODE_CLASS_MAPPINGS["GGUFVideoVAELoader"].RETURN_TYPES == ("VAE",)
    assert NODE_CLASS_MAPPINGS["GGUFVideoTextEncoderLoader"].RETURN_TYPES == ("CLIP",)
    assert NODE_DISPLAY_NAME_MAPPINGS["GGUFVideoTextEncoderLoader"] == \
        "Load Text Encoder (GGUF, ggufvideo)"


def test_registration_folder_reexports_the_mappings_as_comfyui_imports_it():
    # ComfyUI imports a custom-node folder as a module named after the folder.
    name = REGISTRATION.parent.name
    assert name != "ggufvideo", "the folder would shadow the ggufvideo package"
    spec = importlib.util.spec_from_file_location(name, REGISTRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS is NODE_DISPLAY_NAME_MAPPINGS


# -- model folders --------------------------------------------------------------------------------
@pytest.fixture
def model_tree(tmp_path):
    dm, unet, vae = tmp_path / "diffusion_models", tmp_path / "unet", tmp_path / "vae"
    for d in (dm, unet, vae, dm / "wan"):
        d.mkdir(parents=True)
    for f in (dm / "a.gguf", dm / "wan" / "b.GGUF", dm / "c.safetensors", unet / "a.gguf",
              unet / "d.gguf", vae / "v.gguf", dm / ".hidden.gguf"):
        f.write_bytes(b"")
    (tmp_path / "alias").symlink_to(dm)
    folders = {"diffusion_models": [str(dm), str(unet)], "unet": [str(dm), str(unet), str(tmp_path / "alias")],
               "vae": [str(vae)]}

    def lookup(name):
        return folders[name]

    return tmp_path, lookup


def test_list_gguf_lists_each_file_once_when_folders_are_registered_twice(model_tree):
    _, lookup = model_tree
    assert paths.list_gguf(("diffusion_models", "unet"), lookup) == ["a.gguf", "d.gguf", "wan/b.GGUF"]
    assert paths.list_gguf(("vae",), lookup) == ["v.gguf"]


def test_list_gguf_skips_unknown_folder_names_and_missing_directories(model_tree, tmp_path):
    _, lookup = model_tree

    def partial(name):
        if name == "unet":
            raise KeyError(name)
        return [str(tmp_path / "nowhere")] if name == "missing" else lookup(name)

    assert paths.list_gguf(("unet", "missing", "vae"), partial) == ["v.gguf"]


def test_resolve_takes_the_first_folder_and_rejects_escaping_names(model_tree):
    root, lookup = model_tree
    assert paths.resolve("a.gguf", ("diffusion_models", "unet"), lookup) == str(root / "diffusion_models" / "a.gguf")
    assert paths.resolve("d.gguf", ("diffusion_models", "unet"), lookup) == str(root / "unet" / "d.gguf")
    assert paths.resolve("wan/b.GGUF", ("diffusion_models",), lookup).endswith(os.path.join("wan", "b.GGUF"))
    for bad in ("../vae/v.gguf", str(root / "vae" / "v.gguf"), ""):
        with pytest.raises(paths.ModelFileError, match="invalid model file name"):
            paths.resolve(bad, ("diffusion_models",), lookup)
    with pytest.raises(paths.ModelFileError, match=r"'nope.gguf' not found .*diffusion_models/unet.*searched"):
        paths.resolve("nope.gguf", ("diffusion_models", "unet"), lookup)
    assert issubclass(paths.ModelFileError, GGUFError)


def test_node_inputs_list_gguf_files_from_comfyui_folder_paths(model_tree, monkeypatch):
    _, lookup = model_tree
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(get_folder_paths=lookup))
    loader = nodes.GGUFVideoModelLoader.INPUT_TYPES()["required"]
    assert loader["model_name"][0] == ["a.gguf", "d.gguf", "wan/b.GGUF"]
    assert loader["precision"][0] == ["auto", "float32", "float16", "bfloat16"]
    assert nodes.GGUFVideoVAELoader.INPUT_TYPES()["required"]["vae_name"][0] == ["v.gguf"]
    assert nodes.GGUFVideoInspect.INPUT_TYPES()["required"]["gguf_name"][0] == [
        "diffusion_models/a.gguf", "diffusion_models/d.gguf", "diffusion_models/wan/b.GGUF", "vae/v.gguf"]


def test_inspect_node_reports_types_and_restored_shapes(tmp_path, monkeypatch):
    from ggufvideo.writer import save_state_dict

    (tmp_path / "vae").mkdir()
    sd = {"conv.weight": torch.randn(64, 32, 3, 3, 3), "conv.bias": torch.randn(64)}
    save_state_dict(sd, tmp_path / "vae" / "tiny.gguf", qtype="Q8_0")
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(
        get_folder_paths=lambda name: [str(tmp_path / name)]))
    out = nodes.GGUFVideoInspect().inspect("vae/tiny.gguf", True)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "conv.weight" in text and "Q8_0" in text and "64x32x3x3x3" in text
    with pytest.raises(paths.ModelFileError, match="expected '<folder>/<file>.gguf'"):
        nodes.GGUFVideoInspect().inspect("tiny.gguf", True)


def test_precision_choice_maps_to_dtypes_and_rejects_unknown_names():
    # "auto" means what ggufvideo.loader.resolve_dtype("auto", device) means; for the model and
    # VAE loaders it means ComfyUI's own choice (chosen_dtype -> None)
    assert chosen_dtype("auto") is None and chosen_dtype("float16") is torch.float16
    with pytest.raises(ComfyLoadError, match="unknown precision 'half'"):
        chosen_dtype("half")
    assert precision_dtype("auto") is torch.bfloat16
    assert precision_dtype("auto", "cpu") is resolve_dtype("auto", "cpu")
    assert precision_dtype("float32") is torch.float32
    assert precision_dtype("float16") is torch.float16
    assert precision_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ComfyLoadError, match="unknown precision 'fp8'.*auto, float32"):
        precision_dtype("fp8")
    assert tuple(nodes.PRECISIONS) == ("auto", "float32", "float16", "bfloat16")


# -- the quant-aware layers -----------------------------------------------------------------------
def test_layers_are_built_without_allocating_weights_and_keep_quantized_ones_on_load():
    Linear = comfy_quant_class(FakeLinear)
    layer = Linear(64, 16, bias=True, dtype=torch.float32)
    assert layer.weight is None and layer.bias is None  # nothing allocated
    assert isinstance(layer, FakeLinear) and isinstance(layer, nn.Linear)
    w = quantized(torch.randn(16, 64))
    b = torch.randn(16)
    result = layer.load_state_dict({"weight": w, "bias": b}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert isinstance(layer.weight, GGMLTensor) and isinstance(layer.weight, nn.Parameter)
    assert layer.weight.raw.data_ptr() == w.raw.data_ptr()  # assigned, not copied or decoded
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, w.dequantize(), b))


def test_loading_reports_shape_mismatches_and_missing_weights():
    layer = comfy_quant_class(FakeLinear)(64, 16)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: the file has shape \[16, 32\], the model expects \[16, 64\]"):
        layer.load_state_dict({"weight": quantized(torch.randn(16, 32)), "bias": torch.zeros(16)})
    layer = comfy_quant_class(FakeLinear)(64, 16)
    result = layer.load_state_dict({"weight": quantized(torch.randn(16, 64))}, strict=False)
    assert result.missing_keys == ["bias"]
    with pytest.raises(RuntimeError, match="'bias' was never loaded"):
        layer(torch.randn(1, 64))


def test_forward_follows_the_input_dtype_and_compute_dtype():
    layer = comfy_quant_class(FakeLinear)(64, 8)
    w = quantized(torch.randn(8, 64))
    layer.load_state_dict({"weight": w, "bias": torch.randn(8)})
    x = torch.randn(2, 64)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, F.linear(x.to(torch.bfloat16), w.dequantize(torch.bfloat16),
                                     layer.bias.to(torch.bfloat16)))
    layer.compute_dtype = torch.float16
    assert layer(x).dtype == torch.float16


def test_weight_functions_patch_the_float32_decode_once_and_leave_parameters_untouched():
    layer = comfy_quant_class(FakeLinear)(64, 8)
    w = quantized(torch.randn(8, 64))
    bias = torch.randn(8)
    layer.load_state_dict({"weight": w, "bias": bias})
    seen = []

    def add_one(t):
        seen.append(t.dtype)
        t += 1.0  # ComfyUI's calculate_weight works in place
        return t

    layer.weight_function = [add_one]
    layer.bias_function = [add_one]
    x = torch.randn(2, 64)
    out = layer(x.to(torch.bfloat16))
    expected = F.linear(x.to(torch.bfloat16), (w.dequantize() + 1).to(torch.bfloat16),
                        (bias + 1).to(torch.bfloat16))
    assert torch.equal(out, expected)
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(layer.bias, bias)  # the plain float32 bias was patched as a copy
    assert layer.weight.raw.data_ptr() == w.raw.data_ptr()


def test_dynamic_vram_lowvram_function_is_applied_before_weight_functions():
    layer = comfy_quant_class(FakeLinear)(32, 4, bias=False)
    w = quantized(torch.randn(4, 32))
    layer.load_state_dict({"weight": w})
    layer.weight_lowvram_function = lambda t: t * 2
    layer.weight_function = [lambda t: t + 1]
    x = torch.randn(1, 32)
    assert torch.equal(layer(x), F.linear(x, w.dequantize() * 2 + 1))


def test_fetch_weight_moves_raw_blocks_and_decodes_on_the_target_device():
    w = quantized(torch.randn(4, 32))
    out = fetch_weight(w, torch.float16, torch.device("cpu"))
    assert out.dtype == torch.float16 and torch.equal(out, w.dequantize(torch.float16))
    assert fetch_weight(None, torch.float32, torch.device("cpu")) is None
    meta = w.to("meta")  # a move keeps the blocks: the moved tensor is still quantized
    assert isinstance(meta, GGMLTensor) and meta.raw.device.type == "meta"


def test_subclass_forward_still_runs_under_the_quant_layer():
    conv = FakeCausalConv3d(4, 8, 3, padding=1)
    w = quantized(torch.randn(8, 4, 3, 3, 3))
    b = torch.randn(8)
    conv.weight, conv.bias = nn.Parameter(w.dequantize()), nn.Parameter(b)
    x = torch.randn(1, 4, 3, 6, 6)
    reference = conv(x), conv(x[:, :, :1])
    assert quantize_module_classes(conv) == 1
    assert isinstance(conv, FakeCausalConv3d) and type(conv).__name__ == "GGUFVideoFakeCausalConv3d"
    conv.weight = nn.Parameter(w, requires_grad=False)
    assert torch.equal(conv(x), reference[0])  # temporal padding of the subclass's forward
    assert torch.equal(conv(x[:, :, :1]), reference[1])  # the autopad fast path slices the decode


def test_norms_and_embeddings_decode_their_weights():
    norm = comfy_quant_class(FakeRMSNorm)(64, eps=1e-6)
    wn = quantized(torch.randn(64) * 0.1 + 1)
    norm.load_state_dict({"weight": wn})
    x = torch.randn(2, 64)
    assert torch.equal(norm(x), F.rms_norm(x, (64,), wn.dequantize(), 1e-6))
    emb = comfy_quant_class(FakeEmbedding)(10, 32)
    we = quantized(torch.randn(10, 32))
    emb.load_state_dict({"weight": we})
    idx = torch.tensor([[1, 7], [3, 3]])
    assert torch.equal(emb(idx), we.dequantize()[idx])


def test_layers_survive_deepcopy_and_report_raw_sizes():
    layer = comfy_quant_class(FakeLinear)(256, 16)
    w = quantized(torch.randn(16, 256))
    layer.load_state_dict({"weight": w, "bias": torch.randn(16)})
    clone = copy.deepcopy(layer)
    assert type(clone) is type(layer) and isinstance(clone.weight, GGMLTensor)
    x = torch.randn(1, 256)
    assert torch.equal(clone(x), layer(x))
    assert raw_state_bytes(layer) == w.raw.nbytes + 16 * 4
    assert layer.weight.nbytes == w.raw.nbytes  # what ComfyUI's module_size counts per layer


def test_classes_without_a_torch_layer_get_no_quant_class():
    assert comfy_quant_class(nn.GELU) is None
    assert comfy_quant_class(comfy_quant_class(FakeLinear)) is comfy_quant_class(FakeLinear)


# -- the model patcher ----------------------------------------------------------------------------
class FakeModelPatcher:
    """The parts of ComfyUI's ModelPatcher the adapter's patcher relies on."""

    def __init__(self, model):
        self.model = model
        self.patches: dict = {}
        self.backup: dict = {}
        self.size = 0
        self.fallbacks: list = []

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False):
        self.fallbacks.append(key)

    def model_size(self):
        return 123

    def clone(self):
        n = self.__class__(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.backup = self.backup
        return n


@pytest.fixture
def fake_comfy_lora(monkeypatch):
    """comfy.lora.calculate_weight for patches of the form ("diff", tensor, strength)."""
    def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32):
        for kind, delta, strength in patches:
            assert kind == "diff"
            weight += strength * delta.to(weight.dtype)
        return weight

    comfy = types.ModuleType("comfy")
    lora = types.ModuleType("comfy.lora")
    lora.calculate_weight = calculate_weight
    comfy.lora = lora
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.lora", lora)


def _patched_model():
    model = nn.Module()
    model.q = comfy_quant_class(FakeLinear)(64, 8)
    w = quantized(torch.randn(8, 64))
    bias = torch.randn(8)
    model.q.load_state_dict({"weight": w, "bias": bias})
    return model, w, bias


def test_patching_a_weight_for_the_device_it_is_on_keeps_its_parameter(fake_comfy_lora):
    model, _, _ = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    patcher.patches = {"q.weight": [("diff", torch.zeros(8, 64), 1.0)]}
    before = model.q.weight
    patcher.patch_weight_to_device("q.weight", device_to="cpu:0")  # the tensor reports "cpu"
    assert model.q.weight is before


def test_lora_on_a_quantized_layer_is_deferred_to_forward_without_decoding(fake_comfy_lora, monkeypatch):
    model, w, bias = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    assert type(patcher).__name__ == "GGUFVideoFakeModelPatcher"
    assert isinstance(patcher.clone(), type(patcher))
    assert patcher.model_size() == w.raw.nbytes + 8 * 4
    delta = 0.01 * torch.randn(8, 64)
    patcher.patches = {"q.weight": [("diff", delta, 1.0)], "q.bias": [("diff", torch.ones(8), 0.5)]}

    decodes = []
    real = GGMLTensor.dequantize
    monkeypatch.setattr(GGMLTensor, "dequantize", lambda self, *a, **k: decodes.append(1) or real(self, *a, **k))
    patcher.patch_weight_to_device("q.weight", device_to=torch.device("cpu"))
    patcher.patch_weight_to_device("q.bias")
    assert decodes == []  # nothing decoded while patching
    assert patcher.fallbacks == ["q.bias"]  # plain weights go to ComfyUI's own path
    assert model.q.weight is w or model.q.weight.raw.data_ptr() == w.raw.data_ptr()
    backup = patcher.backup["q.weight"]
    assert isinstance(backup, Backup) and backup.weight is model.q.weight and not backup.inplace_update

    x = torch.randn(2, 64)
    expected = F.linear(x, w.dequantize() + delta, bias)
    assert torch.allclose(model.q(x), expected, rtol=0, atol=1e-6)
    # ComfyUI undoes patches by restoring and dropping the backup entry: the patch goes inert.
    patcher.backup.pop("q.weight")
    assert not model.q.ggufvideo_patches["weight"].active()
    assert torch.equal(model.q(x), F.linear(x, w.dequantize(), bias))


def test_a_deferred_patch_is_not_applied_twice_alongside_comfyuis_lowvram_patch(fake_comfy_lora):
    model, w, bias = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    delta = 0.01 * torch.randn(8, 64)
    patcher.patches = {"q.weight": [("diff", delta, 1.0)]}
    patcher.patch_weight_to_device("q.weight")
    x = torch.randn(2, 64)
    once = model.q(x)
    # partially_unload: the backup is restored and popped, then a LowVramPatch is installed.
    patcher.backup.pop("q.weight")
    model.q.weight_function = [DeferredPatch(patcher.patches, "q.weight", {"q.weight": "t"}, "t",
                                             sys.modules["comfy.lora"].calculate_weight)]
    assert torch.equal(model.q(x), once)


def test_return_weight_gives_the_patched_decode_and_leaves_the_layer(fake_comfy_lora):
    model, w, _ = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    delta = 0.01 * torch.randn(8, 64)
    patcher.patches = {"q.weight": [("diff", delta, 2.0)]}
    out = patcher.patch_weight_to_device("q.weight", return_weight=True)
    assert torch.allclose(out, w.dequantize() + 2 * delta, rtol=0, atol=1e-6)
    assert "q.weight" not in patcher.backup and not model.q.ggufvideo_patches


# -- with ComfyUI itself --------------------------------------------------------------------------
def test_operations_are_comfyuis_with_quant_aware_layers():
    comfy_ops = pytest.importorskip("comfy.ops", reason="ComfyUI not installed")
    from ggufvideo.comfy.loading import operations

    ops = operations()
    assert issubclass(ops, comfy_ops.disable_weight_init)
    for name in ("Linear", "Conv2d", "Conv3d", "LayerNorm", "RMSNorm", "GroupNorm"):
        assert issubclass(getattr(ops, name), getattr(comfy_ops.disable_weight_init, name))
    layer = ops.Linear(64, 8)
    w = quantized(torch.randn(8, 64))
    layer.load_state_dict({"weight": w, "bias": torch.zeros(8)})
    x = torch.randn(1, 64)
    assert torch.equal(layer(x), F.linear(x, w.dequantize(), torch.zeros(8)))


def test_moving_a_layer_moves_raw_blocks_without_decoding():
    layer = comfy_quant_class(FakeLinear)(64, 8)
    w = quantized(torch.randn(8, 64))
    layer.load_state_dict({"weight": w, "bias": torch.randn(8)})
    layer.to("meta")  # what ComfyUI's model.to(device) does, on a device CI has
    assert isinstance(layer.weight, GGMLTensor) and layer.weight.raw.device.type == "meta"
    assert layer.weight.raw.dtype == torch.uint8 and layer.weight.raw.shape == w.raw.shape


@pytest.mark.gpu
def test_offloaded_weights_are_fetched_to_the_gpu_as_raw_blocks(fake_comfy_lora):
    cuda = torch.device("cuda")
    model, w, bias = _patched_model()  # weights stay on the CPU (ComfyUI's low-VRAM offload)
    x = torch.randn(4, 64)
    expected = F.linear(x.to(cuda), w.dequantize().to(cuda), bias.to(cuda))
    out = model.q(x.to(cuda))
    assert out.device.type == "cuda" and torch.equal(out, expected)
    assert model.q.weight.device.type == "cpu"  # the stored weight did not move
    conv = FakeCausalConv3d(4, 8, 3, padding=1)
    wc = quantized(torch.randn(8, 4, 3, 3, 3))
    conv.weight, conv.bias = nn.Parameter(wc.dequantize()), nn.Parameter(torch.randn(8))
    xc = torch.randn(1, 4, 3, 6, 6)
    reference = conv.to(cuda)(xc.to(cuda))
    conv.to("cpu")
    quantize_module_classes(conv)
    conv.weight = nn.Parameter(wc, requires_grad=False)
    assert torch.equal(conv(xc.to(cuda)), reference)
    # Resident on the GPU (ComfyUI's full load: module.to(device)), with a LoRA deferred to forward.
    patcher = make_quant_patcher(FakeModelPatcher(model))
    delta = 0.01 * torch.randn(8, 64)
    patcher.patches = {"q.weight": [("diff", delta.to(cuda), 1.0)]}
    patcher.patch_weight_to_device("q.weight", device_to=cuda)
    model.to(cuda)
    assert isinstance(model.q.weight, GGMLTensor) and model.q.weight.raw.device.type == "cuda"
    out = model.q(x.to(cuda))
    assert torch.allclose(out, F.linear(x, w.dequantize() + delta, bias).to(cuda), rtol=0, atol=1e-5)


def test_diffusers_named_files_are_renamed_to_comfyuis_names_as_raw_blocks():
    """ComfyUI's model detection knows the original release's names; a file converted with the
    default (source) layout from a diffusers folder is renamed on load, weights kept quantized."""
    diffusers = pytest.importorskip("diffusers")
    from ggufvideo.comfy.loading import _to_original_layout

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128,
                                            num_layers=1, ffn_dim=512, text_dim=64, freq_dim=32)
    sd = {k: quantized(v) if v.dim() == 2 and v.shape[-1] % 32 == 0 else v
          for k, v in model.state_dict().items()}
    out = _to_original_layout(sd, "w.gguf")
    assert "blocks.0.self_attn.q.weight" in out and "head.modulation" in out
    q = out["blocks.0.self_attn.q.weight"]
    assert isinstance(q, GGMLTensor)
    assert torch.equal(q.raw, sd["blocks.0.attn1.to_q.weight"].raw)
    assert _to_original_layout(out, "w.gguf") is out  # already ComfyUI's names: untouched


# -- the text-encoder loader ----------------------------------------------------------------------
def _install_fake_comfy(monkeypatch, layers: dict) -> types.ModuleType:
    """Stand-ins for ``comfy``, ``comfy.ops`` (``disable_weight_init`` with ``layers``) and
    ``comfy.sd`` in ``sys.modules``, the adapter's cached operations dropped; returns the
    ``comfy.sd`` module for the caller to give its loaders."""
    from ggufvideo.comfy import loading

    comfy = types.ModuleType("comfy")
    ops = types.ModuleType("comfy.ops")
    ops.disable_weight_init = type("disable_weight_init", (), layers)
    sd_mod = types.ModuleType("comfy.sd")
    comfy.ops, comfy.sd = ops, sd_mod
    for name, mod in (("comfy", comfy), ("comfy.ops", ops), ("comfy.sd", sd_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(loading, "_OPERATIONS", None)
    return sd_mod


@pytest.fixture
def fake_comfy_sd(monkeypatch):
    """comfy.ops / comfy.sd stand-ins: load_text_encoder_state_dicts builds a T5-like module from
    the custom operations and loads the state dict into it, as ComfyUI's T5 does."""
    calls = {}
    sd_mod = _install_fake_comfy(monkeypatch, {
        "Linear": FakeLinear, "Embedding": FakeEmbedding, "RMSNorm": FakeRMSNorm})
    sd_mod.CLIPType = types.SimpleNamespace(WAN="WAN", LTXV="LTXV", MOCHI="MOCHI", COSMOS="COSMOS")

    def load_text_encoder_state_dicts(state_dicts, clip_type, model_options, embedding_directory):
        sd = state_dicts[0]
        calls.update(keys=set(sd), clip_type=clip_type, options=model_options, sd=sd)
        o = model_options["custom_operations"]
        model = nn.Module()
        vocab, dim = sd["shared.weight"].shape
        model.shared = o.Embedding(vocab, dim)
        model.q = o.Linear(dim, dim, bias=False)
        model.shared.load_state_dict({"weight": sd["shared.weight"]})
        model.q.load_state_dict({"weight": sd["encoder.block.0.layer.0.SelfAttention.q.weight"]})
        return types.SimpleNamespace(patcher=FakeModelPatcher(model), model=model)

    sd_mod.load_text_encoder_state_dicts = load_text_encoder_state_dicts
    return calls


def _llama_cpp_t5(path):
    from ggufvideo.writer import save_state_dict

    g = torch.Generator().manual_seed(0)
    sd = {"token_embd.weight": torch.randn(64, 64, generator=g),
          "enc.blk.0.attn_q.weight": torch.randn(64, 64, generator=g),
          "enc.blk.0.attn_k.weight": torch.randn(64, 64, generator=g),
          "enc.blk.0.attn_rel_b.weight": torch.randn(32, 4, generator=g),
          "enc.output_norm.weight": torch.ones(64),
          "dec.blk.0.attn_q.weight": torch.randn(64, 64, generator=g)}
    save_state_dict(sd, path, qtype="Q8_0", metadata={"general.architecture": "t5"})
    return sd


def test_text_encoder_node_maps_llama_cpp_names_and_keeps_the_embedding_quantized(
        tmp_path, monkeypatch, fake_comfy_sd):
    (tmp_path / "text_encoders").mkdir()
    src = _llama_cpp_t5(tmp_path / "text_encoders" / "umt5.gguf")
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(
        get_folder_paths=lambda name: [str(tmp_path / name)]))
    node = NODE_CLASS_MAPPINGS["GGUFVideoTextEncoderLoader"]
    assert node.INPUT_TYPES()["required"]["clip_name"][0] == ["umt5.gguf"]
    assert node.INPUT_TYPES()["required"]["type"][0] == ["wan", "ltxv", "mochi", "cosmos"]
    (clip,) = node().load("umt5.gguf", "wan", "float32")
    keys = fake_comfy_sd["keys"]
    assert "shared.weight" in keys and "encoder.block.0.layer.0.SelfAttention.q.weight" in keys
    assert "encoder.final_layer_norm.weight" in keys
    assert not any(k.startswith(("dec.", "enc.", "token_embd")) for k in keys)  # decoder dropped
    assert fake_comfy_sd["clip_type"] == "WAN"
    assert fake_comfy_sd["options"]["custom_operations"].__name__ == "GGUFVideoOps"
    emb = clip.model.shared
    assert isinstance(emb.weight, GGMLTensor)  # the token embedding stays quantized
    ids = torch.tensor([[3, 7, 1]])
    want = emb.weight.dequantize(torch.float32)[ids]
    assert torch.equal(emb(ids), want)
    assert (src["token_embd.weight"][ids] - want).abs().max() < 0.05
    assert type(clip.patcher).__name__ != "FakeModelPatcher"  # the adapter's patcher


def test_text_encoder_node_refuses_other_models_and_types(tmp_path, fake_comfy_sd):
    from ggufvideo.comfy.loading import load_text_encoder
    from ggufvideo.writer import save_state_dict

    path = tmp_path / "te.gguf"
    _llama_cpp_t5(path)
    with pytest.raises(ComfyLoadError, match="unknown text-encoder type 'sd15'"):
        load_text_encoder(str(path), "sd15")
    vae = tmp_path / "vae.gguf"
    save_state_dict({"conv.weight": torch.randn(8, 4, 3, 3, 3)}, vae)
    with pytest.raises(ComfyLoadError, match="vae.gguf: expected a T5/UMT5 text encoder"):
        load_text_encoder(str(vae), "wan")


# -- the model and VAE loaders' precision ---------------------------------------------------------
@pytest.fixture
def fake_comfy_models(monkeypatch):
    """comfy.sd stand-ins for the model and VAE loaders that pick a dtype the way ComfyUI does
    when none is given (``picks``: what "ComfyUI" chooses) and record what they were given."""
    calls: dict = {}
    picks = {"unet": torch.float16, "manual_cast": None, "vae": torch.float32}
    sd_mod = _install_fake_comfy(monkeypatch, {"Linear": FakeLinear, "Conv3d": FakeConv3d})

    def load_diffusion_model_state_dict(sd, model_options):
        calls["options"] = dict(model_options)
        model = nn.Module()
        model.q = model_options["custom_operations"].Linear(64, 64, bias=False)
        model.norm = nn.LayerNorm(64)
        model.load_state_dict({"q.weight": sd["blocks.0.q.weight"], "norm.weight": sd["norm.weight"],
                               "norm.bias": sd["norm.bias"]})
        dtype = model_options.get("dtype") or picks["unet"]
        model.get_dtype = lambda: dtype
        model.manual_cast_dtype = picks["manual_cast"]
        return FakeModelPatcher(model)

    class VAE:
        def __init__(self, sd, dtype):
            calls["vae_dtype"] = dtype
            self.vae_dtype = dtype or picks["vae"]
            m = nn.Module()
            m.conv = FakeConv3d(4, 32, 3, bias=False)
            m.conv.weight = nn.Parameter(sd["conv.weight"].clone().to(self.vae_dtype))
            self.first_stage_model, self.patcher = m, FakeModelPatcher(m)

    sd_mod.load_diffusion_model_state_dict = load_diffusion_model_state_dict
    sd_mod.VAE = VAE
    return calls, picks


def _tiny_model_file(path):
    from ggufvideo.writer import save_state_dict

    g = torch.Generator().manual_seed(0)
    save_state_dict({"blocks.0.q.weight": quantized(torch.randn(64, 64, generator=g)),
                     "norm.weight": torch.ones(64), "norm.bias": torch.zeros(64)}, path)
    return str(path)


@pytest.mark.parametrize("manual_cast", [None, torch.bfloat16])
def test_model_loader_auto_leaves_the_dtype_to_comfyui(tmp_path, fake_comfy_models, manual_cast):
    from ggufvideo.comfy.loading import load_diffusion_model

    calls, picks = fake_comfy_models
    picks["manual_cast"] = manual_cast
    patcher = load_diffusion_model(_tiny_model_file(tmp_path / "m.gguf"), "auto")
    assert "dtype" not in calls["options"]  # ComfyUI picks it, as for its own checkpoints
    w = patcher.model.q.weight
    assert isinstance(w, GGMLTensor)
    # the quantized weight reports the dtype ComfyUI computes in: its manual-cast dtype if any
    assert w.dtype == (manual_cast or torch.float16)
    assert patcher.model.norm.weight.dtype == torch.float32  # plain tensors: ComfyUI's business


def test_model_loader_passes_an_explicit_precision_and_keeps_fp8_picks_as_they_are(
        tmp_path, fake_comfy_models):
    from ggufvideo.comfy.loading import load_diffusion_model

    calls, picks = fake_comfy_models
    path = _tiny_model_file(tmp_path / "m.gguf")
    patcher = load_diffusion_model(path, "bfloat16")
    assert calls["options"]["dtype"] is torch.bfloat16
    assert patcher.model.q.weight.dtype == torch.bfloat16
    picks["manual_cast"] = torch.float32  # ComfyUI on a CPU: stored bfloat16, computed in float32
    patcher = load_diffusion_model(path, "bfloat16")
    assert patcher.model.q.weight.dtype == torch.float32
    picks["manual_cast"] = None
    picks["unet"] = torch.float8_e4m3fn  # ComfyUI's --fp8_e4m3fn-unet: not a decode dtype
    patcher = load_diffusion_model(path, "auto")
    assert patcher.model.q.weight.dtype == torch.float32  # left as read
    with pytest.raises(ComfyLoadError, match="unknown precision 'fp64'"):
        load_diffusion_model(path, "fp64")


def test_vae_loader_auto_takes_comfyuis_vae_dtype(tmp_path, fake_comfy_models):
    from ggufvideo.comfy.loading import load_vae
    from ggufvideo.writer import save_state_dict

    calls, picks = fake_comfy_models
    path = tmp_path / "vae.gguf"
    w = torch.randn(32, 4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    save_state_dict({"conv.weight": quantized(w)}, path)
    vae = load_vae(str(path), "auto")
    assert calls["vae_dtype"] is None  # ComfyUI's vae_dtype() decides
    assert vae.first_stage_model.conv.weight.dtype == torch.float32
    picks["vae"] = torch.bfloat16
    vae = load_vae(str(path), "auto")
    assert vae.first_stage_model.conv.weight.dtype == torch.bfloat16
    vae = load_vae(str(path), "float16")
    assert calls["vae_dtype"] is torch.float16
    assert vae.first_stage_model.conv.weight.dtype == torch.float16


# -- LoRA patches run unmerged ----------------------------------------------------------------------
class FakeLoRAAdapter:
    """ComfyUI's ``comfy.weight_adapter.lora.LoRAAdapter``: ``name`` and ``weights``."""

    name = "lora"

    def __init__(self, up, down, alpha):
        self.weights = (up, down, alpha, None, None, None)


def _lora_patch(strength, up, down, alpha, old_style=False):
    value = ("lora", (up, down, alpha, None, None, None)) if old_style \
        else FakeLoRAAdapter(up, down, alpha)
    return (strength, value, 1.0, None, None)


@pytest.mark.parametrize("old_style", [False, True])
def test_lora_patches_run_unmerged_beside_the_quantized_weight(fake_comfy_lora, old_style):
    from ggufvideo.comfy.patcher import DeferredLora

    model, w, bias = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(8, 4, generator=g), torch.randn(4, 64, generator=g)
    patcher.patches = {"q.weight": [_lora_patch(0.5, up, down, 2.0, old_style)]}
    patcher.patch_weight_to_device("q.weight")
    assert isinstance(model.q.ggufvideo_patches["weight"], DeferredLora)
    x = torch.randn(3, 64)
    base = F.linear(x, w.dequantize(), bias)
    # never merged: the fake calculate_weight only knows "diff" patches and would fail on these
    expected = base + F.linear(F.linear(x, down), up) * (0.5 * 2.0 / 4)
    assert torch.equal(model.q(x), expected)
    # a strength change is a new patch list: the adapters follow it
    patcher.patches["q.weight"] = [_lora_patch(-1.0, up, down, 2.0, old_style)]
    assert torch.equal(model.q(x), base + F.linear(F.linear(x, down), up) * (-1.0 * 2.0 / 4))
    # unpatching (backup restored and dropped) gives the exact base output back
    patcher.backup.pop("q.weight")
    assert torch.equal(model.q(x), base)


def test_two_loras_stack_and_other_patch_types_keep_the_merge_path(fake_comfy_lora):
    from ggufvideo.comfy.patcher import DeferredLora

    model, w, bias = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    up1, down1 = torch.randn(8, 2), torch.randn(2, 64)
    up2, down2 = torch.randn(8, 3), torch.randn(3, 64)
    patcher.patches = {"q.weight": [_lora_patch(1.0, up1, down1, None),
                                    _lora_patch(0.3, up2, down2, 3.0)]}
    patcher.patch_weight_to_device("q.weight")
    x = torch.randn(2, 64)
    expected = F.linear(x, w.dequantize(), bias) + F.linear(F.linear(x, down1), up1) * 1.0
    expected = expected + F.linear(F.linear(x, down2), up2) * (0.3 * 3.0 / 3)
    assert torch.equal(model.q(x), expected)
    # a "diff" patch among them: decode and patch, as before
    patcher.backup.pop("q.weight")
    delta = 0.01 * torch.randn(8, 64)
    patcher.patches = {"q.weight": [("diff", delta, 1.0)]}
    patcher.patch_weight_to_device("q.weight")
    assert not isinstance(model.q.ggufvideo_patches["weight"], DeferredLora)
    assert torch.allclose(model.q(x), F.linear(x, w.dequantize() + delta, bias), atol=1e-6)


class FakeWeightAdapter:
    """ComfyUI's LoHaAdapter / LoKrAdapter: ``name`` and the ``weights`` tuple."""

    def __init__(self, name, weights):
        self.name, self.weights = name, weights


def _lycoris_patch(kind, strength, f, alpha):
    if kind == "loha":
        weights = (f["a1"], f["b1"], alpha, f["a2"], f["b2"], None, None, None)
    else:
        weights = (f["w1"], None, alpha, None, None, f["a2"], f["b2"], None, None)
    return (strength, FakeWeightAdapter(kind, weights), 1.0, None, None)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_patches_run_unmerged_too(fake_comfy_lora, kind):
    from ggufvideo.comfy.patcher import DeferredLora
    from ggufvideo.ops import KronAdapter

    model, w, bias = _patched_model()
    patcher = make_quant_patcher(FakeModelPatcher(model))
    g = torch.Generator().manual_seed(1)
    if kind == "loha":  # rank 2 x 2: one rank-4 pair
        f = {"a1": torch.randn(8, 2, generator=g), "b1": torch.randn(2, 64, generator=g),
             "a2": torch.randn(8, 2, generator=g), "b2": torch.randn(2, 64, generator=g)}
        delta = (f["a1"] @ f["b1"]) * (f["a2"] @ f["b2"]) * (3.0 / 2)
    else:  # w1 (2, 4) whole, w2 = a2 @ b2 (4, 16) of rank 2
        f = {"w1": torch.randn(2, 4, generator=g), "a2": torch.randn(4, 2, generator=g),
             "b2": torch.randn(2, 16, generator=g)}
        delta = torch.kron(f["w1"], f["a2"] @ f["b2"]) * (3.0 / 2)
    patcher.patches = {"q.weight": [_lycoris_patch(kind, 0.5, f, 3.0)]}
    patcher.patch_weight_to_device("q.weight")
    deferred = model.q.ggufvideo_patches["weight"]
    assert isinstance(deferred, DeferredLora)
    (adapter,) = deferred.adapters()
    assert isinstance(adapter, KronAdapter) == (kind == "lokr")
    x = torch.randn(3, 64)
    # never merged: the fake calculate_weight only knows "diff" patches and would fail on these
    expected = F.linear(x, w.dequantize() + 0.5 * delta, bias)
    assert torch.allclose(model.q(x), expected, rtol=1e-5, atol=1e-4)
    patcher.backup.pop("q.weight")
    assert torch.equal(model.q(x), F.linear(x, w.dequantize(), bias))


def test_lycoris_patches_that_cannot_run_unmerged_keep_comfyuis_path():
    from ggufvideo.comfy.patcher import patch_adapter

    f = {"w1": torch.randn(2, 4), "a2": torch.randn(4, 2), "b2": torch.randn(2, 16)}
    assert patch_adapter(_lycoris_patch("lokr", 1.0, f, None), (8, 64)) is not None
    assert patch_adapter(_lycoris_patch("lokr", 1.0, f, None), (16, 32)) is None  # other shape
    dora = FakeWeightAdapter("lokr", (f["w1"], None, None, None, None, f["a2"], f["b2"], None,
                                      torch.ones(8)))
    assert patch_adapter((1.0, dora, 1.0, None, None), (8, 64)) is None
    narrowed = FakeWeightAdapter("lokr", _lycoris_patch("lokr", 1.0, f, None)[1].weights)
    narrowed.row_offset = 8  # ComfyUI's LoKr cut to some rows of a fused product
    assert patch_adapter((1.0, narrowed, 1.0, None, None), (8, 64)) is None
    big = {"a1": torch.randn(8, 8), "b1": torch.randn(8, 64), "a2": torch.randn(8, 8),
           "b2": torch.randn(8, 64)}  # rank 64 > what a dense 8 x 64 weight costs
    assert patch_adapter(_lycoris_patch("loha", 1.0, big, None), (8, 64)) is None
    assert patch_adapter((1.0, FakeWeightAdapter("oft", ()), 1.0, None, None), (8, 64)) is None
    odd = {"a1": torch.randn(8, 2), "b1": torch.randn(2, 64), "a2": torch.randn(4, 2),
           "b2": torch.randn(2, 64)}  # products of different shapes: ComfyUI's path reports it
    assert patch_adapter(_lycoris_patch("loha", 1.0, odd, None), (8, 64)) is None


def test_umt5_tokenizer_for_comfyui_is_rebuilt_from_the_files_vocabulary(tmp_path):
    """ComfyUI's wan text encoder reads its tokenizer from a serialized sentencepiece model stored
    with the weights; a GGUF file carries the vocabulary as tokenizer.ggml.* metadata instead."""
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    from ggufvideo import save_state_dict, tokenizer_from_gguf
    from ggufvideo.comfy.loading import _spiece_model
    from ggufvideo.demo_generate import write_demo_files

    path = write_demo_files(str(tmp_path))["text_encoder"]
    blob = _spiece_model(path)
    assert blob is not None and blob.dtype == torch.uint8
    sp = spm.SentencePieceProcessor(model_proto=blob.numpy().tobytes())
    ref = tokenizer_from_gguf(path)
    for text in ("a cat walks on the beach", "Sunset, 2 dogs!"):
        assert sp.encode(text) + [sp.eos_id()] == ref(text)["input_ids"], text
    vae = tmp_path / "vae.gguf"
    save_state_dict({"conv.weight": torch.randn(8, 4, 3, 3, 3)}, vae)
    assert _spiece_model(str(vae)) is None  # no vocabulary: nothing to rebuild


def test_a_text_encoder_that_does_not_fit_comfyuis_is_named(tmp_path, fake_comfy_sd,
                                                            monkeypatch):
    """ComfyUI builds its encoders at their released sizes; a file of another size fails in its
    load_state_dict with a RuntimeError: the node says which file and which tensor."""
    import comfy.sd

    from ggufvideo.comfy.loading import load_text_encoder

    def too_small(**kwargs):
        raise RuntimeError("Error(s) in loading state_dict for T5:\n\tsize mismatch for "
                           "shared.weight: copying a param with shape [64, 64], the shape in "
                           "current model is torch.Size([256384, 4096]).")

    monkeypatch.setattr(comfy.sd, "load_text_encoder_state_dicts", too_small)
    path = tmp_path / "small-umt5.gguf"
    _llama_cpp_t5(path)
    with pytest.raises(ComfyLoadError, match=r"small-umt5.gguf: its tensors do not fit "
                                             r"ComfyUI's wan text encoder.*shared.weight"):
        load_text_encoder(str(path), "wan")


def test_a_model_that_does_not_fit_comfyuis_is_named(tmp_path, fake_comfy_models, monkeypatch):
    import comfy.sd

    from ggufvideo.comfy.loading import load_diffusion_model

    def misfit(sd, model_options):
        raise RuntimeError("Error(s) in loading state_dict for WanModel:\n\tsize mismatch for "
                           "text_embedding.0.weight: copying a param with shape [256, 64]")

    monkeypatch.setattr(comfy.sd, "load_diffusion_model_state_dict", misfit)
    with pytest.raises(ComfyLoadError, match=r"m.gguf: its tensors do not fit the model ComfyUI "
                                             r"detected.*text_embedding.0.weight"):
        load_diffusion_model(_tiny_model_file(tmp_path / "m.gguf"), "auto")
