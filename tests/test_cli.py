"""The ggufvideo command: convert, inspect, validate, demo; exit statuses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ggufvideo import GGUFFile
from ggufvideo.cli import main
from ggufvideo.writer import save_state_dict

safetensors_torch = pytest.importorskip("safetensors.torch")


def _model(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.self_attn.q.weight": torch.randn(64, 256, generator=g),
          "blocks.0.ffn.2.weight": torch.randn(64, 256, generator=g),
          "blocks.0.self_attn.q.bias": torch.randn(64, generator=g),
          "patch_embedding.weight": torch.randn(64, 16, 1, 2, 2, generator=g)}
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(sd, path)
    return path


def test_convert_command_writes_the_file_and_prints_a_summary(tmp_path, capsys):
    src = _model(tmp_path)
    rc = main(["convert", str(src), str(tmp_path / "m.gguf"), "--type", "Q8_0", "-q",
               "--override", r"ffn\.2\.weight$=keep"])
    out = capsys.readouterr().out
    assert rc == 0 and "wrote" in out and "Q8_0" in out
    with GGUFFile(tmp_path / "m.gguf") as g:
        assert g.tensors["blocks.0.self_attn.q.weight"].qtype.name == "Q8_0"
        assert g.tensors["blocks.0.ffn.2.weight"].qtype.name == "F32"


def test_convert_refuses_existing_destination_without_force(tmp_path, capsys):
    src = _model(tmp_path)
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"old")
    assert main(["convert", str(src), str(dst), "-t", "Q8_0", "-q"]) == 1
    assert "--force" in capsys.readouterr().err and dst.read_bytes() == b"old"
    assert main(["convert", str(src), str(dst), "-t", "Q8_0", "-q", "--force"]) == 0


def test_convert_keep_type_and_verbose_listing(tmp_path, capsys):
    src = _model(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "k.gguf"), "--type", "keep", "-q", "-v"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.self_attn.q.weight: F32 (source precision)" in out


def test_bad_override_syntax_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "a", "b", "--override", "no-equals-sign"])
    assert exc.value.code == 2


def test_unknown_type_is_an_error_exit(tmp_path, capsys):
    src = _model(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "x.gguf"), "--type", "Q9_K", "-q"]) == 1
    assert "Q9_K" in capsys.readouterr().err


def _legacy_imatrix(path, entries: dict[str, int]) -> None:
    """A legacy llama.cpp .dat importance matrix: count, (name, ncall, nval, values)..."""
    import struct

    parts = [struct.pack("<i", len(entries))]
    for name, n in entries.items():
        parts += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", 1, n),
                  struct.pack(f"<{n}f", *[1.0 + (i % 7) for i in range(n)])]
    path.write_bytes(b"".join(parts))


def test_convert_with_imatrix_and_rename_reports_its_use(tmp_path, capsys):
    src = _model(tmp_path)
    imat = tmp_path / "im.dat"
    _legacy_imatrix(imat, {"model.blocks.0.self_attn.q.weight": 256})
    rc = main(["convert", str(src), str(tmp_path / "m.gguf"), "-t", "Q4_K", "-q", "-v",
               "--imatrix", str(imat), "--imatrix-rename", r"^model\.="])
    out = capsys.readouterr().out
    assert rc == 0 and "imatrix: 1 tensor(s) quantized with importance weights" in out
    assert "blocks.0.self_attn.q.weight: Q4_K" in out and "[imatrix]" in out
    with GGUFFile(tmp_path / "m.gguf") as g:
        assert g.metadata["quantize.imatrix.file"] == str(imat)
        assert g.metadata["quantize.imatrix.entries_count"] == 1


def test_convert_with_a_bad_imatrix_is_an_error_exit(tmp_path, capsys):
    src = _model(tmp_path)
    imat = tmp_path / "im.dat"
    imat.write_bytes(b"\x02\x00")
    rc = main(["convert", str(src), str(tmp_path / "m.gguf"), "-q", "--imatrix", str(imat)])
    err = capsys.readouterr().err
    assert rc == 1 and str(imat) in err and "too short" in err
    assert not (tmp_path / "m.gguf").exists()


def test_imatrix_rename_without_imatrix_is_an_error_exit(tmp_path, capsys):
    rc = main(["convert", str(_model(tmp_path)), str(tmp_path / "m.gguf"), "-q",
               "--imatrix-rename", "^a=b"])
    assert rc == 1 and "--imatrix-rename needs --imatrix" in capsys.readouterr().err


def test_inspect_lists_tensors_totals_and_summarises_long_arrays(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    save_state_dict({"w.weight": torch.randn(64, 256), "c": torch.randn(8, 8, 2, 2, 2)}, path,
                    qtype="Q8_0", metadata={"vocab": [f"t{i}" for i in range(1000)]})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "w.weight" in out and "64x256" in out and "8x8x2x2x2" in out
    assert "[1000 items" in out and "totals per type" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["vocab"]["length"] == 1000
    assert {t["name"]: t["shape"] for t in info["tensors"]}["c"] == [8, 8, 2, 2, 2]
    assert info["totals"]["Q8_0"]["count"] == 1


def test_validate_passes_a_clean_file(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    save_state_dict({"w.weight": torch.randn(64, 256), "b": torch.randn(4)}, path, qtype="Q8_0")
    assert main(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def _corrupt_scale(path, tensor: str) -> None:
    """Set the first block's f16 scale ``d`` of a Q8_0 tensor to +inf."""
    with GGUFFile(path) as g:
        offset = g.tensors[tensor].offset
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00\x7c")  # f16 +inf


def test_validate_reports_non_finite_scales_by_tensor(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    save_state_dict({"good.weight": torch.randn(64, 256), "bad.weight": torch.randn(64, 256)},
                    path, qtype="Q8_0")
    _corrupt_scale(path, "bad.weight")
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "bad.weight" in out and "non-finite scale" in out and "good.weight" not in out
    assert main(["validate", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and len(report["errors"]) == 1


def test_validate_reports_non_finite_values_in_float_tensors(tmp_path, capsys):
    w = torch.randn(4, 4)
    w[1, 1] = float("nan")
    save_state_dict({"w": w}, tmp_path / "m.gguf")
    assert main(["validate", str(tmp_path / "m.gguf")]) == 1
    assert "1 non-finite value" in capsys.readouterr().out


def test_validate_reports_a_broken_header_without_crashing(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    save_state_dict({"w.weight": torch.randn(64, 256)}, path, qtype="Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated data section
    assert main(["validate", str(path)]) == 1
    assert "header" in capsys.readouterr().out


def test_validate_warns_about_what_ggml_c_loader_refuses(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    save_state_dict({"x" * 70: torch.zeros(4)}, path)
    assert main(["validate", str(path)]) == 0
    assert "warning" in capsys.readouterr().out


def test_missing_file_is_an_error_exit(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.gguf")]) == 1
    assert "nope.gguf" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(tmp_path):
    path = tmp_path / "m.gguf"
    save_state_dict({"w": torch.zeros(4)}, path)
    proc = subprocess.run([sys.executable, "-m", "ggufvideo", "inspect", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_tensors"] == 1


def test_demo_runs_end_to_end_with_the_builtin_model(tmp_path, capsys):
    assert main(["demo", "--builtin", "--types", "Q8_0", "--keep-files", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rel. error" in out and "Q8_0" in out
    row = next(line for line in out.splitlines() if line.startswith("Q8_0 "))
    err = float(row.split()[-3])
    assert 0 < err < 0.05
    assert os.path.exists(tmp_path / "model-Q8_0.gguf")
    if importlib.util.find_spec("diffusers") and importlib.util.find_spec("transformers"):
        # the whole generate path: three GGUF files -> WanPipeline -> frames -> video + sheet
        assert "WanPipeline from 3 GGUF files" in out and "generated 5 frames" in out
        for name in ("text_encoder-Q8_0.gguf", "transformer-Q8_0.gguf", "vae-Q8_0.gguf",
                     "demo.png"):
            assert os.path.exists(tmp_path / name), name


def test_demo_no_generate_skips_the_generation_run(tmp_path, capsys):
    assert main(["demo", "--builtin", "--types", "Q8_0", "--no-generate", "--keep-files",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "WanPipeline" not in out and "generated" not in out


def test_inspect_shows_a_tensor_with_bad_shape_metadata_and_validate_fails(tmp_path, capsys):
    from gguf import GGUFValueType

    from ggufvideo.writer import TypedValue

    path = tmp_path / "m.gguf"
    bad = TypedValue(GGUFValueType.ARRAY, [3, 3], GGUFValueType.INT32)  # 9 != 16 elements
    save_state_dict({"w": torch.zeros(16)}, path, metadata={"w.raw_shape": bad})
    assert main(["inspect", str(path)]) == 0
    assert "bad shape metadata" in capsys.readouterr().out
    assert main(["validate", str(path)]) == 1


# -- a new user's first contact (issue 19) ---------------------------------------------------


def test_version_flag_prints_the_package_version(capsys):
    import ggufvideo

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ggufvideo {ggufvideo.__version__}"


def test_unknown_type_lists_the_valid_names(tmp_path, capsys):
    src = _model(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "o.gguf"), "-t", "Q4_KM", "-q"]) == 1
    err = capsys.readouterr().err
    assert "'Q4_KM'" in err and "Q4_K" in err and "Q4_K_M" in err and "Q8_0" in err


def test_inspect_into_a_closed_pipe_stops_quietly(tmp_path):
    dst = tmp_path / "m.gguf"
    # far more output than a pipe buffers, so the writer is still writing when the reader leaves
    save_state_dict({f"blocks.{i}.weight": torch.zeros(4) for i in range(4000)}, dst)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "ggufvideo", "inspect", str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) in (0, 141)
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err


def test_missing_destination_folder_is_named_not_the_temporary(tmp_path, capsys):
    src = _model(tmp_path)
    dst = tmp_path / "no" / "such" / "m.gguf"
    assert main(["convert", str(src), str(dst), "-q"]) == 1
    err = capsys.readouterr().err
    assert str(dst) in err and "does not exist" in err and ".partial" not in err


def test_converted_file_name_drops_the_source_type_tag(tmp_path):
    src = _model(tmp_path)
    src = src.rename(tmp_path / "model-F32.safetensors")
    assert main(["convert", str(src), str(tmp_path / "a.gguf"), "-q", "-t", "Q8_0"]) == 0
    with GGUFFile(tmp_path / "a.gguf") as g:
        assert g.metadata["general.name"] == "model"
    # requantizing a GGUF whose own name carries a tag
    save_state_dict({"w": torch.zeros(64, 256)}, tmp_path / "b.gguf",
                    metadata={"general.name": "wan_bf16"})
    assert main(["convert", str(tmp_path / "b.gguf"), str(tmp_path / "c.gguf"), "-q"]) == 0
    with GGUFFile(tmp_path / "c.gguf") as g:
        assert g.metadata["general.name"] == "wan"


def test_save_state_dict_refuses_an_existing_file_like_convert(tmp_path):
    dst = tmp_path / "x.gguf"
    save_state_dict({"w": torch.zeros(2)}, dst)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_state_dict({"w": torch.ones(2)}, dst)
    save_state_dict({"w": torch.ones(2)}, dst, overwrite=True)


def test_demo_says_its_temporary_files_are_removed(capsys):
    main(["demo", "--builtin", "--types", "Q8_0", "-q"])
    out = capsys.readouterr().out
    assert "temporary folder, removed at the end" in out and "now removed" in out
