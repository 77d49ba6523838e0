"""Interrupted and failing conversions leave nothing half-done.

A conversion that fails (an exception, a full disk, a file size limit) or is stopped (Ctrl-C,
SIGTERM, SIGKILL) never leaves a file at the destination and never changes the source. An existing
destination is replaced only with ``--force``, and only once its replacement is complete. A killed
process cannot clean up after itself: it leaves one clearly named ``<dst>.<pid>.<random>.partial``
that the next write to the same destination removes.

The signal tests run the real command in a subprocess on a 64 MB source and signal it once its
temporary file holds tensor data (polled), so the signal lands mid-write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ggufvideo import GGUFFile
from ggufvideo.cli import main
from ggufvideo.convert import convert
from ggufvideo.errors import QuantizationError
from ggufvideo.writer import save_state_dict

safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

# 16 tensors of 1M float32 values (64 MB): quantizing each to Q8_0 takes ~0.05-0.2 s on one core,
# so a signal sent once the first tensor is written arrives while later ones are being produced
# (measured: 0.5-1.2 s between that moment and the end of an uninterrupted run with 8 tensors).
_N_TENSORS = 16
_ROWS, _COLS = 1024, 1024
_TYPE = "Q8_0"
_POLL_S = 0.005
_TIMEOUT_S = 120


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def big_sources(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """kind -> (path, sha256) of the same 64 MB checkpoint as safetensors, .pt and F32 GGUF."""
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.ffn.weight": torch.randn(_ROWS, _COLS, generator=g)
          for i in range(_N_TENSORS)}
    folder = tmp_path_factory.mktemp("src")
    paths = {"safetensors": folder / "model.safetensors", "pt": folder / "model.pt",
             "gguf": folder / "model.gguf"}
    safetensors_torch.save_file(sd, paths["safetensors"])
    torch.save(sd, paths["pt"])
    save_state_dict(sd, paths["gguf"])  # lossless F32
    return {kind: (path, _sha(path)) for kind, path in paths.items()}


@pytest.fixture(scope="module")
def big_source(big_sources) -> tuple[Path, str]:
    return big_sources["safetensors"]


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    safetensors_torch.save_file({"w.weight": torch.randn(64, 256, generator=g)}, path)
    return path


def _temporaries(dst: Path) -> list[Path]:
    """The ``<dst name>.<pid>.<random>.partial`` files next to ``dst``."""
    pattern = re.compile(re.escape(dst.name) + r"\.[0-9]+\.[a-z0-9_]{8}\.partial")
    return sorted(p for p in dst.parent.iterdir() if pattern.fullmatch(p.name))


def _child_setup(fsize_limit: int | None = None):
    def setup() -> None:
        # A child of a shell that ignores SIGINT (a background job) would inherit that, and
        # Python would then not raise KeyboardInterrupt: make Ctrl-C mean Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
            # Otherwise the kernel kills the process with SIGXFSZ instead of failing the write.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return setup


def _start(src: Path, dst: Path, *extra: str, qtype: str = _TYPE,
           fsize_limit: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ggufvideo", "convert", str(src), str(dst), "-t", qtype, "-q",
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_child_setup(fsize_limit))


def _wait_until_writing(proc: subprocess.Popen, dst: Path) -> Path:
    """Poll until the child's temporary holds more than its header (a tensor's data)."""
    deadline = time.monotonic() + _TIMEOUT_S
    one_tensor = _ROWS * _COLS // 4  # fewer bytes than any quantized tensor of the source
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"conversion ended (rc {proc.returncode}) before it could be "
                        f"interrupted: {err.decode(errors='replace')[-2000:]}")
        for tmp in _temporaries(dst):
            try:
                if tmp.stat().st_size > one_tensor:
                    return tmp
            except FileNotFoundError:
                pass
        time.sleep(_POLL_S)
    proc.kill()
    proc.communicate()
    pytest.fail("no temporary file appeared")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=_TIMEOUT_S)
    return proc.returncode, err.decode(errors="replace")


def _assert_next_run_cleans_up(src: Path, dst: Path, *, force: bool = False) -> None:
    """The next conversion to ``dst`` removes what a killed one left and writes a sound file."""
    convert(src, dst, qtype="Q8_0", force=force)
    assert _temporaries(dst) == []
    with GGUFFile(dst) as g:
        assert len(g.tensors) == 1


# -- exceptions ------------------------------------------------------------------------------


def test_exception_midway_leaves_no_destination_no_temporary_and_source_unchanged(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {f"blocks.{i}.weight": torch.randn(256, 256, generator=g) for i in range(4)}
    sd["blocks.4.weight"] = torch.full((256, 256), float("nan"))  # fails after 4 tensors written
    src = tmp_path / "nan.safetensors"
    safetensors_torch.save_file(sd, src)
    digest = _sha(src)
    dst = tmp_path / "out.gguf"
    with pytest.raises(QuantizationError, match="non-finite"):
        convert(src, dst, qtype="Q8_0")
    assert not dst.exists() and _temporaries(dst) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]
    assert _sha(src) == digest


def test_exception_with_force_keeps_the_old_destination_byte_identical(tmp_path, small_source):
    dst = tmp_path / "out.gguf"
    convert(small_source, dst, qtype="Q8_0")
    old = _sha(dst)
    src = tmp_path / "nan.safetensors"
    safetensors_torch.save_file({"a.weight": torch.randn(64, 256),
                                 "b.weight": torch.full((64, 256), float("inf"))}, src)
    with pytest.raises(QuantizationError):
        convert(src, dst, qtype="Q8_0", force=True)
    assert _sha(dst) == old and _temporaries(dst) == []


class _DiskFullOS:
    """``os`` whose ``write`` fails with ENOSPC once ``room`` bytes have been written."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name: str):
        return getattr(os, name)

    def write(self, fd: int, data) -> int:
        n = min(len(data), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return os.write(fd, memoryview(data)[:n])


def test_disk_full_is_an_os_error_naming_the_destination_and_leaves_nothing(
        tmp_path, small_source, monkeypatch, capsys):
    import ggufvideo.publish as publish

    dst = tmp_path / "out.gguf"
    monkeypatch.setattr(publish, "os", _DiskFullOS(room=10_000))
    with pytest.raises(OSError) as exc:
        convert(small_source, dst, qtype="F32")
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(dst)
    assert not dst.exists() and _temporaries(dst) == []
    # The command says so in one line, without a traceback.
    monkeypatch.setattr(publish, "os", _DiskFullOS(room=10_000))
    assert main(["convert", str(small_source), str(dst), "-t", "F32", "-q"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(dst) in err and "Traceback" not in err
    assert not dst.exists() and _temporaries(dst) == []


def test_file_size_limit_is_a_clear_error_with_no_partial_destination(tmp_path, big_source):
    src, digest = big_source
    dst = tmp_path / "out.gguf"
    # Q8_0 of the source is ~17 MB: the limit stops the write after a few tensors.
    proc = _start(src, dst, fsize_limit=3 << 20)
    rc, err = _finish(proc)
    assert rc == 1, err
    assert "File too large" in err and str(dst) in err and "Traceback" not in err
    assert not dst.exists() and _temporaries(dst) == []
    assert _sha(src) == digest


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_mid_write_leaves_no_destination_and_no_temporary(
        tmp_path, big_source, sig, status, word):
    src, digest = big_source
    dst = tmp_path / "out.gguf"
    proc = _start(src, dst)
    _wait_until_writing(proc, dst)
    proc.send_signal(sig)
    rc, err = _finish(proc)
    assert rc == status and word in err and "Traceback" not in err, err
    assert not dst.exists() and _temporaries(dst) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert _sha(src) == digest


@pytest.mark.parametrize("kind", ["safetensors", "pt", "gguf"])
def test_sigkill_mid_write_leaves_only_a_named_temporary_that_the_next_run_removes(
        tmp_path, big_sources, small_source, kind):
    src, digest = big_sources[kind]
    dst = tmp_path / "out.gguf"
    proc = _start(src, dst)
    tmp = _wait_until_writing(proc, dst)
    proc.kill()
    assert _finish(proc)[0] == -signal.SIGKILL
    assert not dst.exists()
    assert _temporaries(dst) == [tmp] and f".{proc.pid}." in tmp.name
    assert _sha(src) == digest
    _assert_next_run_cleans_up(small_source, dst)


def test_sigkill_with_force_keeps_the_old_destination_byte_identical(
        tmp_path, big_source, small_source):
    src, digest = big_source
    dst = tmp_path / "out.gguf"
    convert(small_source, dst, qtype="Q8_0")
    old = _sha(dst)
    proc = _start(src, dst, "--force")
    _wait_until_writing(proc, dst)
    assert _sha(dst) == old  # still the old file while the new one is being written
    proc.kill()
    _finish(proc)
    assert _sha(dst) == old
    assert _sha(src) == digest
    _assert_next_run_cleans_up(small_source, dst, force=True)


# -- the destination and other writers' temporaries -----------------------------------------


def test_existing_destination_is_refused_without_force_and_nothing_is_written(
        tmp_path, small_source, capsys):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"precious")
    assert main(["convert", str(small_source), str(dst), "-t", "Q8_0", "-q"]) == 1
    assert "--force" in capsys.readouterr().err
    with pytest.raises(FileExistsError):
        save_state_dict({"w": torch.zeros(32)}, dst, overwrite=False)
    assert dst.read_bytes() == b"precious" and _temporaries(dst) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_spares_live_writers_and_files_it_did_not_make(tmp_path, small_source):
    import fcntl

    dst = tmp_path / "out.gguf"
    stale = tmp_path / f"out.gguf.{_dead_pid()}.abcd1234.partial"
    live_pid = tmp_path / f"out.gguf.{os.getpid()}.abcd1234.partial"  # a writer still running
    # A writer elsewhere (another host on a network filesystem): its pid means nothing here,
    # but it holds the lock.
    locked = tmp_path / f"out.gguf.{_dead_pid()}.lockedxx.partial"
    others = [tmp_path / "out.gguf.partial", tmp_path / "out.gguf.backup",
              tmp_path / "other.gguf.1.abcd1234.partial", tmp_path / "out.gguf.1.abcd1234.part"]
    for p in [stale, live_pid, locked, *others]:
        p.write_bytes(b"x")
    with open(locked, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        convert(small_source, dst, qtype="Q8_0")
    assert not stale.exists()
    assert live_pid.exists() and locked.exists() and all(p.exists() for p in others)
