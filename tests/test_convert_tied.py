"""Tied tensors: keys sharing one storage are written under each key and encoded once."""

from __future__ import annotations

import torch

from ggufvideo import GGUFFile
from ggufvideo import writer as writer_module
from ggufvideo.convert import convert
from ggufvideo.quants import quantize
from ggufvideo.writer import save_state_dict


def _tied_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(128, 256, generator=g)
    return {"embed.weight": emb, "blocks.0.ffn.0.weight": torch.randn(64, 256, generator=g),
            "head.weight": emb}  # tied: the same tensor under two keys


def _count_quantized_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    real = writer_module._quantize_rows

    def counting(x, qtype, *args):
        rows.append(x.shape[0])
        return real(x, qtype, *args)

    monkeypatch.setattr(writer_module, "_quantize_rows", counting)
    return rows


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    with GGUFFile(path) as g:
        return {n: (i.qtype.name, g.tensor_data(i).numpy().tobytes()) for n, i in g.tensors.items()}


def test_tied_pt_tensors_are_written_under_each_key_and_quantized_once(tmp_path, monkeypatch):
    sd = _tied_sd()
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    rows = _count_quantized_rows(monkeypatch)
    s = convert(src, tmp_path / "out.gguf", qtype="Q4_K")
    assert sum(rows) == 128 + 64  # the tied data once, not 2 x 128 rows
    assert s.tied == {"head.weight": "embed.weight"}
    assert "tied: 1 tensor(s)" in str(s)
    out = _tensors(tmp_path / "out.gguf")
    assert set(out) == set(sd)
    want = quantize(sd["embed.weight"], "Q4_K").numpy().tobytes()
    assert out["embed.weight"] == out["head.weight"] == ("Q4_K", want)
    assert s.bytes_in == (128 + 64) * 256 * 4  # the shared storage counted once


def test_tied_tensors_with_different_types_are_each_encoded(tmp_path, monkeypatch):
    sd = _tied_sd()
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    s = convert(src, tmp_path / "out.gguf", qtype="Q4_K", overrides={r"^head\.": "Q8_0"})
    assert s.tied == {}
    out = _tensors(tmp_path / "out.gguf")
    assert out["embed.weight"] == ("Q4_K", quantize(sd["embed.weight"], "Q4_K").numpy().tobytes())
    assert out["head.weight"] == ("Q8_0", quantize(sd["embed.weight"], "Q8_0").numpy().tobytes())


def test_views_of_one_storage_that_differ_are_not_tied(tmp_path):
    base = torch.randn(2, 64, 256)
    sd = {"a.weight": base[0], "b.weight": base[1], "c.weight": base[0].t().contiguous().t()}
    s = save_state_dict(sd, tmp_path / "out.gguf", qtype="Q8_0")
    assert s.tied == {}
    out = _tensors(tmp_path / "out.gguf")
    assert out["a.weight"][1] == quantize(base[0], "Q8_0").numpy().tobytes()
    assert out["b.weight"][1] == quantize(base[1], "Q8_0").numpy().tobytes()


def test_save_state_dict_encodes_tied_tensors_once(tmp_path, monkeypatch):
    sd = _tied_sd()
    rows = _count_quantized_rows(monkeypatch)
    s = save_state_dict(sd, tmp_path / "out.gguf", qtype="Q6_K")
    assert sum(rows) == 128 + 64 and s.tied == {"head.weight": "embed.weight"}
    out = _tensors(tmp_path / "out.gguf")
    assert out["embed.weight"] == out["head.weight"]


def test_tied_plain_tensors_are_copied_under_each_key(tmp_path):
    sd = _tied_sd()
    src = tmp_path / "tied.pt"
    torch.save(sd, src)
    s = convert(src, tmp_path / "out.gguf", qtype=None)  # keep every tensor's precision
    assert s.tied == {"head.weight": "embed.weight"}
    out = _tensors(tmp_path / "out.gguf")
    assert out["head.weight"] == out["embed.weight"] == ("F32", sd["embed.weight"].numpy().tobytes())
