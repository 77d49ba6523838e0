"""Every type through a real file: written by gguf-py's writer, loaded eager and lazy by us."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from strategies import finite_blocks

from ggufvideo import GGMLTensor, load_state_dict
from ggufvideo.quants import get_quant_type, registered_types

QUANTIZED = [q for q, c in registered_types().items() if c.torch_dtype is None]


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_quantized_type_round_trips_through_a_gguf_py_file(tmp_path, qtype):
    qt = get_quant_type(qtype)
    rows, blocks_per_row = 3, 2
    raw = finite_blocks(qtype, rows * blocks_per_row, seed=int(qtype)).reshape(rows, -1)
    path = tmp_path / f"{qtype.name}.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ref = gguf.quants.dequantize(raw, qtype)  # gguf-py's numpy decoder, exact for finite scales
    eager = load_state_dict(path)["w"]
    lazy = load_state_dict(path, lazy=True)["w"]
    assert eager.shape == (rows, blocks_per_row * qt.block_size) == lazy.shape
    assert isinstance(lazy, GGMLTensor) and torch.equal(lazy.raw, torch.from_numpy(raw))
    np.testing.assert_array_equal(eager.numpy(), ref)
    assert torch.equal(lazy.dequantize(), eager)
    assert torch.equal(load_state_dict(path, dtype="bfloat16")["w"], eager.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64])
def test_plain_type_round_trips_through_a_gguf_py_file(tmp_path, dtype):
    x = (np.random.default_rng(0).standard_normal((4, 6)) * 50).astype(dtype)
    path = tmp_path / "p.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_tensor("x", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for lazy in (False, True):
        got = load_state_dict(path, lazy=lazy)["x"]
        assert type(got) is torch.Tensor
        np.testing.assert_array_equal(got.numpy(), x)


def test_bf16_round_trips_through_a_gguf_py_file(tmp_path):
    x = torch.randn(4, 8).to(torch.bfloat16)
    path = tmp_path / "b.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_tensor("x", x.view(torch.int16).numpy().view(np.uint8), raw_shape=(4, 16), raw_dtype=T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = load_state_dict(path, lazy=True)["x"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, x)
