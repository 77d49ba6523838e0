"""Untrusted containers: pickles are never executed, names from files are data.

Checkpoints come from strangers. A ``.pt``/``.pth`` is read only with ``torch.load(weights_only=
True)``: a pickle that would call anything is refused with a GGUFError naming the file, and the
code never runs. Nothing in the package unpickles a file any other way (checked on its source).

Tensor names and metadata keys may hold ANSI escapes, newlines, carriage returns, NUL, path
separators or 100 kB of text: they never name a file, and ``inspect``, ``validate`` and
``convert`` print them escaped and bounded (``--json`` keeps them complete, JSON-escaped).
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import ggufvideo
from ggufvideo.cli import main
from ggufvideo.convert import convert
from ggufvideo.errors import GGUFError
from ggufvideo.writer import save_state_dict

safetensors_torch = pytest.importorskip("safetensors.torch")

_LONG = "x" * 100_000
HOSTILE_NAMES = [
    "\x1b[31mred\x1b[0m.weight",
    "line\nFAKE: injected.weight",
    "cr\rOVERWRITE.weight",
    "../../etc/passwd",
    "/abs/path.weight",
    "nul\x00byte.weight",
    "\u202eexe.txt",  # right-to-left override: reorders what a terminal shows
    _LONG,
]
HOSTILE_META = {"evil\x1b]0;title\x07.key": "value\x1b[2J\nFAKE: meta",
                "list\nkey": ["a\x1b[31m", "b\rOVER"] * 10,
                "k" * 100_000: "long key"}
# Raw payloads that must never appear in human output (their escaped forms may).
_RAW = ["\x1b", "\x07", "\x00", "\u202e", "\nFAKE", "\rOVER"]
# No output line is longer than this (names are cut to 200 characters, messages to 2000).
_MAX_LINE = 2200


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_terminal_safe(text: str, *, allow_cr: bool = False) -> None:
    allowed = "\n\r" if allow_cr else "\n"
    bad = sorted({c for c in text if not c.isprintable() and c not in allowed})
    assert not bad, f"unescaped characters reach the terminal: {bad!r}"
    for raw in _RAW:
        assert raw not in text, f"raw {raw!r} reaches the terminal"
    assert max(map(len, text.splitlines()), default=0) <= _MAX_LINE


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def hostile_gguf(tmp_path_factory) -> Path:
    """A GGUF file whose tensor names and metadata keys/values are hostile, one tensor NaN."""
    g = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(32, 256, generator=g) for n in HOSTILE_NAMES}
    sd["nan\x1b[2J.weight"] = torch.full((4, 32), float("nan"))
    sd["\x1b[31mfive\nd"] = torch.randn(2, 3, 4, 4, 4, generator=g)  # shape metadata keys too
    # A workspace two levels down, so "../../etc/passwd" would land inside the temporary tree.
    work = tmp_path_factory.mktemp("hostile") / "a" / "b"
    work.mkdir(parents=True)
    path = work / "hostile.gguf"
    save_state_dict(sd, path, qtype="Q8_0", metadata=HOSTILE_META)
    return path


# -- pickles ----------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.system``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_with_pickle(path: Path, payload: bytes) -> None:
    """A torch zip checkpoint whose ``data.pkl`` is ``payload``."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z, zipfile.ZipFile(path, "w") as out:
        for info in z.infolist():
            data = z.read(info.filename)
            out.writestr(info.filename, payload if info.filename.endswith("data.pkl") else data)


_EVIL_WRITERS = {
    "zip_dict": lambda p, m: torch.save({"w": torch.zeros(2), "x": _RunsCode(m)}, p),
    "zip_top_level": lambda p, m: torch.save(_RunsCode(m), p),
    "legacy_format": lambda p, m: torch.save({"w": torch.zeros(2), "x": _RunsCode(m)}, p,
                                             _use_new_zipfile_serialization=False),
    "raw_pickle_v2": lambda p, m: p.write_bytes(pickle.dumps({"x": _RunsCode(m)}, protocol=2)),
    "raw_pickle_v0": lambda p, m: p.write_bytes(pickle.dumps(_RunsCode(m), protocol=0)),
    # Hand-written: GLOBAL builtins.exec called on a string, inside a valid zip checkpoint.
    "zip_exec_global": lambda p, m: _zip_with_pickle(
        p, f"cbuiltins\nexec\n(Vopen({str(m)!r}, 'w')\ntR.".encode()),
}


@pytest.mark.parametrize("kind", sorted(_EVIL_WRITERS))
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, kind, suffix):
    marker = tmp_path / "PWNED"
    src = tmp_path / f"evil{suffix}"
    _EVIL_WRITERS[kind](src, marker)
    with pytest.raises(GGUFError, match="refusing to load") as exc:
        convert(src, tmp_path / "out.gguf")
    assert exc.value.path == str(src) and "nothing in it was executed" in str(exc.value)
    assert not marker.exists() and not (tmp_path / "out.gguf").exists()


def test_refusal_names_what_was_refused_without_torch_advice_or_escapes(tmp_path):
    src = tmp_path / "evil.pt"
    _EVIL_WRITERS["zip_exec_global"](src, tmp_path / "PWNED")
    with pytest.raises(GGUFError) as exc:
        convert(src, tmp_path / "out.gguf")
    message = str(exc.value)
    assert "exec" in message  # the global torch refused
    assert "weights_only` set to `False" not in message and "\x1b" not in message
    assert "\n" not in message


def test_weights_only_cannot_be_switched_off_by_torch_environment_variables(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pt"
    _EVIL_WRITERS["zip_dict"](src, marker)
    with pytest.raises(GGUFError, match="refusing to load"):
        convert(src, tmp_path / "out.gguf")
    assert not marker.exists()


def test_cli_refuses_a_code_running_pickle_with_one_clear_line(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pth"
    _EVIL_WRITERS["legacy_format"](src, marker)
    rc, out, err = _run(capsys, "convert", str(src), str(tmp_path / "out.gguf"), "-q")
    assert rc == 1 and "refusing to load" in err and str(src) in err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b"PK\x03\x04truncated zip",
                                     b"\x80\x04\x95"])
def test_corrupt_pt_is_a_gguf_error_naming_the_file(tmp_path, content):
    src = tmp_path / "broken.pt"
    src.write_bytes(content)
    with pytest.raises(GGUFError) as exc:
        convert(src, tmp_path / "out.gguf")
    assert exc.value.path == str(src)


def test_plain_pt_state_dict_still_converts(tmp_path):
    torch.save({"w.weight": torch.randn(32, 256)}, tmp_path / "ok.pth")
    s = convert(tmp_path / "ok.pth", tmp_path / "ok.gguf", qtype="Q8_0")
    assert s.counts() == {"Q8_0": 1}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            owner = base.id if isinstance(base, ast.Name) else (
                base.attr if isinstance(base, ast.Attribute) else None)
            yield owner, node.func.attr, node


def test_package_source_never_unpickles_a_file():
    """Static check of every module: no pickle/marshal/shelve/dill/joblib loading, no
    ``torch.load`` without ``weights_only=True``, no ``numpy.load`` with pickles allowed."""
    root = Path(ggufvideo.__file__).parent
    problems = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                for mod in mods:
                    if mod.split(".")[0] in ("marshal", "shelve", "dill", "joblib", "cloudpickle"):
                        problems.append(f"{f.name}:{node.lineno}: imports {mod}")
                if isinstance(node, ast.ImportFrom) and node.module == "pickle" and any(
                        a.name in ("load", "loads", "Unpickler") for a in node.names):
                    problems.append(f"{f.name}:{node.lineno}: imports pickle loading")
        for owner, attr, call in _calls(tree):
            where = f"{f.name}:{call.lineno}"
            kw = {k.arg: k.value for k in call.keywords}
            if owner in ("pickle", "_pickle", "cPickle") and attr in ("load", "loads",
                                                                       "Unpickler"):
                problems.append(f"{where}: {owner}.{attr}")
            elif owner == "torch" and attr == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("np", "numpy") and attr == "load":
                ap = kw.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}: numpy.load with allow_pickle")
    assert not problems, problems


# -- hostile names: inspect, validate --------------------------------------------------------


def test_inspect_prints_hostile_names_escaped_and_bounded(hostile_gguf, capsys):
    rc, out, err = _run(capsys, "inspect", str(hostile_gguf))
    assert rc == 0 and not err
    _assert_terminal_safe(out)
    # Every tensor is still listed, recognisably.
    assert "\\x1b[31mred\\x1b[0m.weight" in out and "line\\nFAKE: injected.weight" in out
    assert "../../etc/passwd" in out and "nul\\x00byte.weight" in out
    assert "...(100000 chars)" in out
    assert "evil\\x1b]0;title\\x07.key" in out  # keys too
    assert len(out) < 20_000  # a 100 kB name and a 100 kB key, each shown cut


def test_inspect_json_keeps_names_complete_and_escaped(hostile_gguf, capsys):
    rc, out, _ = _run(capsys, "inspect", "--json", str(hostile_gguf))
    assert rc == 0
    assert out.isascii() and all(c.isprintable() or c == "\n" for c in out)
    info = json.loads(out)
    names = {t["name"] for t in info["tensors"]}
    assert set(HOSTILE_NAMES) <= names  # data, exactly as in the file
    assert "evil\x1b]0;title\x07.key" in info["metadata"]
    assert info["metadata"]["evil\x1b]0;title\x07.key"] == HOSTILE_META["evil\x1b]0;title\x07.key"]


@pytest.mark.parametrize("as_json", [False, True])
def test_validate_reports_hostile_names_escaped_and_bounded(hostile_gguf, capsys, as_json):
    rc, out, err = _run(capsys, "validate", *(["--json"] if as_json else []), str(hostile_gguf))
    assert rc == 1 and not err  # the NaN tensor
    _assert_terminal_safe(out)
    if as_json:
        report = json.loads(out)
        assert any("nan\\x1b[2J.weight" in e for e in report["errors"])
        assert all(len(m) <= _MAX_LINE for m in report["errors"] + report["warnings"])
    else:
        assert "nan\\x1b[2J.weight" in out and "...(100000 chars)" in out


def _truncated_after(path: Path, name: str, dst: Path) -> Path:
    data = path.read_bytes()
    end = data.index(name.encode()) + len(name.encode())
    dst.write_bytes(data[:end + 2])  # inside the tensor's n_dims
    return dst


@pytest.mark.parametrize("command", ["inspect", "validate", "convert"])
def test_errors_quoting_a_hostile_name_are_escaped_bounded_and_keep_their_end(
        tmp_path, capsys, command):
    name = "y\x1b[31m\n" * 20_000
    save_state_dict({name: torch.zeros(32)}, tmp_path / "ok.gguf")
    bad = _truncated_after(tmp_path / "ok.gguf", name, tmp_path / "bad.gguf")
    argv = [command, str(bad)] + ([str(tmp_path / "out.gguf"), "-q"] if command == "convert"
                                  else [])
    rc, out, err = _run(capsys, *argv)
    assert rc == 1
    _assert_terminal_safe(out + err)
    assert "truncated" in out + err and "but the file has" in out + err  # the message's end
    assert not (tmp_path / "out.gguf").exists()


# -- hostile names: convert ------------------------------------------------------------------


def test_convert_of_hostile_names_writes_one_file_and_prints_them_escaped(hostile_gguf, capsys):
    work = hostile_gguf.parent
    top = work.parent.parent
    before = _tree(top)
    dst = work / "out.gguf"
    # Requantize (Q4_0: the 5-D tensor and tiny ones stay F32), list every decision, show the
    # progress bar: every place a name could be printed.
    rc, out, err = _run(capsys, "convert", str(hostile_gguf), str(dst), "-t", "Q4_0", "-v")
    assert rc == 0, err
    _assert_terminal_safe(out)
    _assert_terminal_safe(err, allow_cr=True)  # tqdm redraws its bar with \r
    assert "line\\nFAKE: injected.weight: Q4_0" in out
    assert _tree(top) == before | {str(dst.relative_to(top))}  # no file named after a tensor
    from ggufvideo import GGUFFile

    with GGUFFile(dst) as g:  # names kept verbatim, as data
        assert set(HOSTILE_NAMES) <= set(g.tensors)


def test_convert_error_naming_a_hostile_tensor_is_escaped(tmp_path, capsys):
    name = "\x1b[2J\x1b[Hclear\nFAKE: done.weight"
    safetensors_torch.save_file({name: torch.full((32, 256), float("nan"))},
                                tmp_path / "m.safetensors")
    rc, out, err = _run(capsys, "convert", str(tmp_path / "m.safetensors"),
                        str(tmp_path / "m.gguf"), "-q", "-t", "Q8_0")
    assert rc == 1 and "non-finite" in err
    _assert_terminal_safe(err)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_summary_notes_and_fallbacks_escape_names(tmp_path, capsys):
    # A .pt with a hostile non-tensor entry (skipped, listed in a note) and a tensor whose rows do
    # not fit Q4_K's blocks (listed as a fallback), both hostile; and a long name (C-loader note).
    sd = {"\x1b[31mnot a tensor\n": 3, "odd\rrows.weight": torch.randn(64, 96),
          "long" + "\x1b" * 300: torch.randn(64, 256)}
    torch.save(sd, tmp_path / "m.pt")
    rc, out, err = _run(capsys, "convert", str(tmp_path / "m.pt"), str(tmp_path / "m.gguf"),
                        "-q", "-t", "Q4_K")
    assert rc == 0, err
    _assert_terminal_safe(out)
    assert "skipped 1 non-tensor entry" in out and "fell back" in out and "odd\\rrows" in out


def test_sharded_index_cannot_point_outside_its_folder_or_smuggle_escapes(tmp_path, capsys):
    (tmp_path / "secret.safetensors").write_bytes(b"not for you")
    folder = tmp_path / "model"
    folder.mkdir()
    safetensors_torch.save_file({"w": torch.randn(4, 32)}, folder / "a.safetensors")
    for shard, error in [("../secret.safetensors", "not a file name"),
                         ("/etc/passwd", "not a file name"),
                         ("\x1b[31mmissing\n.safetensors", "is missing")]:
        index = {"weight_map": {"w": "a.safetensors", "v": shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        rc, out, err = _run(capsys, "convert", str(folder), str(tmp_path / "o.gguf"), "-q")
        assert rc == 1 and error in err, err
        _assert_terminal_safe(err)
    assert not (tmp_path / "o.gguf").exists()


def test_safetensors_header_with_hostile_dtype_or_shape_is_a_clear_error(tmp_path, capsys):
    def write(header: dict) -> Path:
        raw = json.dumps(header).encode()
        p = tmp_path / "h.safetensors"
        p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
        return p

    cases = [{"w": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}},
             {"w": {"dtype": "\x1b[31mF99\n", "shape": [4], "data_offsets": [0, 16]}},
             {"w": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}}]
    for header in cases:
        rc, out, err = _run(capsys, "convert", str(write(header)), str(tmp_path / "o.gguf"),
                            "-q")
        assert rc == 1 and "error:" in err, err
        _assert_terminal_safe(err)
