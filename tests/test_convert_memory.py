"""Streaming memory: converting a model holds about one tensor, for every kind of source.

Each conversion runs in a fresh process that reports its peak RSS above its RSS after imports.
The peak is the kernel's high-water mark ``VmHWM``, reset after imports through
``/proc/self/clear_refs`` -- not ``ru_maxrss``, which in a child starts at the parent's RSS at fork
time and would hide the conversion. Linux only; skipped where the mark cannot be reset.

Memory-mapped sources are the point: a map keeps every page it touched resident, so without
releasing them a conversion's RSS grows to the whole file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ggufvideo.writer import save_state_dict

safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/status (Linux)")

N_TENSORS, ROWS, COLS = 24, 2048, 1024  # 24 tensors of 8 MiB: a 192 MiB model
TENSOR_BYTES = ROWS * COLS * 4
MODEL_BYTES = N_TENSORS * TENSOR_BYTES

_CHILD = textwrap.dedent("""
    import json, sys
    import ggufvideo
    from ggufvideo.convert import convert

    def kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        reset = True
    except OSError:
        reset = False
    base = kib("VmRSS")
    convert(sys.argv[1], sys.argv[2], qtype="Q8_0", force=True)
    print(json.dumps({"reset": reset, "grew": (kib("VmHWM") - base) * 1024}))
""")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("memory")
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.ffn.0.weight": torch.randn(ROWS, COLS, generator=g)
          for i in range(N_TENSORS)}
    paths = {"safetensors": str(folder / "m.safetensors"), "torch": str(folder / "m.pt"),
             "gguf": str(folder / "m.gguf")}
    safetensors_torch.save_file(sd, paths["safetensors"])
    torch.save(sd, paths["torch"])
    save_state_dict(sd, paths["gguf"], qtype="F32")
    return paths


@pytest.mark.parametrize("kind", ["safetensors", "torch", "gguf"])
def test_peak_rss_of_a_conversion_stays_well_below_the_model(sources, kind, tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CHILD, sources[kind], str(tmp_path / "o.gguf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["reset"]:
        pytest.skip("cannot reset the peak-RSS mark (/proc/self/clear_refs not writable)")
    grew = result["grew"]
    # About one tensor read plus its float32 chunk, the quantizer's temporaries and the encoded
    # bytes (30-50 MiB measured, see benchmarks/convert_memory.py); with mapped pages left
    # resident it is the whole 192 MiB model and more. Half the model separates the two with room.
    assert grew < MODEL_BYTES // 2, (
        f"{kind}: peak RSS grew by {grew / 2**20:.1f} MiB converting a "
        f"{MODEL_BYTES / 2**20:.0f} MiB model of {TENSOR_BYTES / 2**20:.0f} MiB tensors")


def _small_pt(tmp_path):
    p = tmp_path / "s.pt"
    torch.save({"a.weight": torch.randn(64, 256), "b.weight": torch.randn(64, 256)}, p)
    return p


def test_mapped_pt_storages_get_page_releasers(tmp_path):
    from ggufvideo.convert import open_source

    src = open_source(_small_pt(tmp_path))
    assert all(t.release is not None for t in src.tensors)


def test_pt_of_the_other_byte_order_is_never_released(tmp_path, monkeypatch):
    # torch.load byte-swaps such a checkpoint in place (private copies of the mapped pages):
    # dropping those pages would bring the unswapped bytes back.
    from ggufvideo.convert import open_source
    from ggufvideo.sources import torch_pickle

    monkeypatch.setattr(torch_pickle, "_byteorder", lambda path: "big")
    src = open_source(_small_pt(tmp_path))
    assert all(t.release is None for t in src.tensors)


def test_released_pages_read_back_the_same_values(tmp_path):
    from ggufvideo.convert import open_source

    p = _small_pt(tmp_path)
    want = torch.load(p, weights_only=True)
    src = open_source(p)
    for t in src.tensors:
        first = t.load().clone()
        t.release()
        assert torch.equal(t.load(), first) and torch.equal(first, want[t.name])
