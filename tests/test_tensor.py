"""GGMLTensor: keeps raw blocks through moves, copies and dtype casts; decodes exactly."""

from __future__ import annotations

import copy
import pickle

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from ggufvideo import GGMLTensor, QuantizationError, TensorOperationError


@pytest.fixture
def w() -> GGMLTensor:
    x = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(x, T.Q8_0))
    return GGMLTensor(raw, T.Q8_0, (8, 64))


def _same_blocks(a: GGMLTensor, b: GGMLTensor) -> bool:
    return a.qtype == b.qtype and a.shape == b.shape and torch.equal(a.raw.cpu(), b.raw.cpu())


def test_metadata_and_exact_dequantize(w):
    assert w.qtype == T.Q8_0 and w.logical_shape == torch.Size([8, 64]) and w.shape == (8, 64)
    assert w.dtype == torch.float32 and w.raw.dtype == torch.uint8 and w.raw.shape == (8, 68)
    ref = gguf.quants.dequantize(w.raw.numpy(), T.Q8_0)
    assert np.array_equal(w.dequantize().numpy(), ref)
    assert torch.equal(w.dequantize(torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))


def test_nbytes_is_the_raw_block_size(w):
    assert w.nbytes == w.raw.nbytes == 8 * 68
    assert w.to(torch.bfloat16).nbytes == w.nbytes


def test_accepts_type_names(w):
    assert GGMLTensor(w.raw, "q8_0", (8, 64)).qtype == T.Q8_0


@pytest.mark.parametrize("cast", [lambda t: t.to(torch.bfloat16), lambda t: t.half(),
                                  lambda t: t.float(), lambda t: t.to(dtype=torch.float16)])
def test_dtype_casts_change_compute_dtype_not_bytes(w, cast):
    c = cast(w)
    assert isinstance(c, GGMLTensor) and _same_blocks(c, w)
    assert torch.equal(c.dequantize(), w.dequantize().to(c.dtype))


def test_integer_cast_gives_values(w):
    i = w.to(torch.int32)
    assert type(i) is torch.Tensor and torch.equal(i, w.dequantize().to(torch.int32))


@pytest.mark.parametrize("op", [lambda t: t.detach(), lambda t: t.clone(), lambda t: copy.deepcopy(t),
                                lambda t: t.cpu(), lambda t: t.to("cpu"),
                                lambda t: pickle.loads(pickle.dumps(t))])
def test_copies_and_moves_keep_the_subclass(w, op):
    c = op(w)
    assert isinstance(c, GGMLTensor) and _same_blocks(c, w) and c.dtype == w.dtype


def test_clone_and_deepcopy_own_their_blocks(w):
    for c in (w.clone(), copy.deepcopy(w)):
        assert c.raw.data_ptr() != w.raw.data_ptr()


def test_meta_device_move(w):
    m = w.to("meta")
    assert isinstance(m, GGMLTensor) and m.device.type == "meta" and m.raw.device.type == "meta"


def test_parameter_wrapping_and_module_moves(w):
    lin = torch.nn.Linear(64, 8, bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    assert isinstance(lin.weight, torch.nn.Parameter) and isinstance(lin.weight, GGMLTensor)
    lin.to(torch.bfloat16)
    assert isinstance(lin.weight, GGMLTensor) and lin.weight.dtype == torch.bfloat16
    assert _same_blocks(lin.weight, w)
    sd = lin.state_dict()
    assert isinstance(sd["weight"], GGMLTensor) and _same_blocks(sd["weight"], w)
    dup = copy.deepcopy(lin)
    assert isinstance(dup.weight, torch.nn.Parameter) and _same_blocks(dup.weight, w)


def test_unaware_ops_compute_on_the_values(w):
    x = torch.randn(3, 64)
    assert torch.equal(torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w.dequantize()))
    assert torch.equal(w + 1, w.dequantize() + 1)


def test_in_place_ops_are_refused(w):
    with pytest.raises(TensorOperationError, match="in-place"):
        w.add_(1)


def test_copy_between_ggml_tensors(w):
    dst = GGMLTensor(torch.zeros_like(w.raw), T.Q8_0, (8, 64))
    dst.copy_(w)
    assert _same_blocks(dst, w)
    plain = torch.empty(8, 64)
    plain.copy_(w)
    assert torch.equal(plain, w.dequantize())


def test_copy_of_plain_values_into_blocks_is_refused(w):
    with pytest.raises(TensorOperationError, match="re-quantizing is not implicit"):
        w.copy_(torch.zeros(8, 64))


def test_repr_is_clear(w):
    r = repr(w)
    assert r.startswith("GGMLTensor(qtype=Q8_0, shape=[8, 64], dtype=torch.float32") and "raw=" in r


def test_bad_construction_raises_clear_errors(w):
    with pytest.raises(QuantizationError, match="must be uint8"):
        GGMLTensor(w.raw.to(torch.int16), T.Q8_0, (8, 64))
    with pytest.raises(QuantizationError, match=r"shape \[8, 32\] needs 272 bytes"):
        GGMLTensor(w.raw, T.Q8_0, (8, 32))
    with pytest.raises(QuantizationError, match="compute dtype must be floating"):
        GGMLTensor(w.raw, T.Q8_0, (8, 64), dtype=torch.int8)


def test_restored_shape_need_not_align_rows_with_blocks():
    x = np.random.default_rng(1).standard_normal((16, 4, 1, 2, 2), dtype=np.float32)
    raw = torch.from_numpy(gguf.quants.quantize(x.reshape(-1, 256), T.Q8_0))
    t = GGMLTensor(raw, T.Q8_0, x.shape)
    ref = gguf.quants.dequantize(raw.numpy(), T.Q8_0).reshape(x.shape)
    assert t.shape == x.shape and np.array_equal(t.dequantize().numpy(), ref)


@pytest.mark.gpu
def test_cuda_moves_and_pinning(w):
    c = w.cuda()
    assert isinstance(c, GGMLTensor) and c.raw.is_cuda and _same_blocks(c, w)
    assert torch.equal(c.dequantize().cpu(), w.dequantize())
    p = w.pin_memory()
    assert isinstance(p, GGMLTensor) and p.is_pinned() and _same_blocks(p, w)
    back = c.to("cpu", non_blocking=False)
    assert isinstance(back, GGMLTensor) and _same_blocks(back, w)


# -- the tensor protocol that libraries written for plain tensors use ---------------------------
def test_torch_load_weights_only_works_out_of_the_box(w, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": w, "b": torch.ones(3)}, path)
    sd = torch.load(path, weights_only=True)
    assert isinstance(sd["w"], GGMLTensor) and _same_blocks(sd["w"], w)


def test_safetensors_save_raises_clear_error(w):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    with pytest.raises(TensorOperationError, match=r"Q8_0 \[8, 64\].*ggufvideo.save_state_dict"):
        safetensors_torch.save({"w": w})


def test_data_ptr_is_the_raw_blocks_pointer(w):
    assert w.data_ptr() == w.raw.data_ptr() != 0
    assert w.detach().data_ptr() == w.data_ptr()  # aliases share it (tied weights)
    assert w.clone().data_ptr() != w.data_ptr()


@pytest.mark.parametrize("op", [lambda t: t.add_(1), lambda t: t.mul_(2.0), lambda t: t.zero_(),
                                lambda t: t.copy_(torch.zeros(8, 64))])
def test_in_place_ops_raise_type_error_not_file_error(w, op):
    with pytest.raises(TypeError) as info:
        op(w)
    assert isinstance(info.value, TensorOperationError)
    assert not isinstance(info.value, QuantizationError)  # not the "malformed file" family


def test_share_memory_moves_raw_blocks_without_crashing(w):
    s = w.share_memory_()
    assert s is w and w.is_shared() and w.raw.is_shared()
    m = torch.nn.Linear(64, 8)
    m.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
    m.share_memory()
    assert m.weight.raw.is_shared()


def test_parameter_style_constructor_shares_blocks(w):
    # accelerate's set_module_tensor_to_device calls type(param)(value, requires_grad=...)
    p = GGMLTensor(w, requires_grad=False)
    assert isinstance(p, torch.nn.Parameter) and p.raw is w.raw and p.qtype == w.qtype
    with pytest.raises(TensorOperationError, match="without a qtype needs a GGMLTensor"):
        GGMLTensor(torch.zeros(3, dtype=torch.uint8))


def test_data_setter_swaps_raw_blocks_and_device(w):
    p = torch.nn.Parameter(w.clone(), requires_grad=False)
    other = w.clone()
    p.data = other
    assert p.raw is other.raw
    p.data = w.to("meta")
    assert p.device.type == "meta" and p.raw.device.type == "meta"
    with pytest.raises(TensorOperationError, match="cannot set .data"):
        p.data = torch.zeros(8, 64)


def test_view_ops_under_inference_mode():
    """diffusers' Wan 2.2 TI2V blocks take ``scale_shift_table.unsqueeze(0)`` inside the
    pipeline's inference mode; a quantized table must give its values, not a version-counter
    error."""
    from ggufvideo import quantize

    w = torch.randn(6, 64)
    q = GGMLTensor(quantize(w, "Q8_0"), T.Q8_0, torch.Size([1, 6, 64]),
                   torch.float32)
    p = torch.nn.Parameter(q, requires_grad=False)
    with torch.inference_mode():
        out = p.unsqueeze(0) + torch.zeros(1, 5, 6, 64)
    assert torch.equal(out[0, 0], q.dequantize()[0])
