"""Publishing a file atomically: write a temporary next to the destination, rename it into place.

Files are written to a temporary file next to the destination (``<name>.<pid>.<random>.partial``)
and renamed into place at the end: a failure (or Ctrl-C) never leaves a partial destination, an
existing destination stays intact until its replacement is complete, and the temporary of a killed
process is removed by the next write to the same destination.

Kept apart from the GGUF byte stream (:mod:`ggufvideo.serialize`) because none of it depends on
what the bytes are: :func:`atomic_file` hands the writer a ``write`` function and does the rest
(locking, stale-temporary cleanup, fsync, no-clobber rename, permissions under the umask, folder
sync).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # Windows: no flock, so stale temporaries are left for the user to delete
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_file"]


@contextmanager
def atomic_file(path: str, overwrite: bool) -> Iterator[Callable[[memoryview], None]]:
    """Write ``path`` through a temporary file; yields ``write(data)``, which writes every byte.

    On a clean exit the data is fsynced, the temporary renamed to ``path`` (never replacing an
    existing file unless ``overwrite``) and the folder synced; on any exception (Ctrl-C included)
    the temporary is removed and ``path`` is left as it was. Write failures are :class:`OSError`
    naming ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        # Checked here so the error names the destination, not the temporary file mkstemp tried.
        raise FileNotFoundError(f"{path}: the destination folder {folder} does not exist")
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path) + f"{os.getpid()}.",
                               suffix=_PARTIAL_SUFFIX, dir=folder)
    try:
        try:
            _lock(fd)
            yield lambda data: _write_all(fd, data, path)
            try:
                os.fsync(fd)  # the data is on disk before the name points at it
            except OSError as exc:
                raise _write_error(exc, path) from None
        finally:
            os.close(fd)  # also releases the lock
        _publish(tmp, path, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _sync_folder(folder)


# -- the temporary file ----------------------------------------------------------------------
#
# A conversion writes ``<dst name>.<pid>.<random>.partial`` next to the destination and renames it
# at the end. An exception or Ctrl-C removes it; a killed process (SIGKILL, power loss) cannot, so
# the next write to the same destination removes the temporaries of processes that are gone. A
# temporary is stale when its writer's pid is not alive here *and* nobody holds the flock every
# writer takes on its temporary (locks die with their process, and on NFS they are seen by other
# hosts, where the pid means nothing).

_PARTIAL_SUFFIX = ".partial"
# Room left in a file name (NAME_MAX is 255 bytes) for ".<pid>.<random>.partial".
_MAX_TEMP_BASE = 200


def _temp_prefix(path: str) -> str:
    """``<dst name>.``: the start of the names of ``path``'s temporaries (before the pid)."""
    base = os.path.basename(path).encode("utf-8", "surrogateescape")[:_MAX_TEMP_BASE]
    return base.decode("utf-8", "ignore") + "."


def _lock(fd: int) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without locks: the pid in the name still protects this file
        pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporaries that killed writes to ``path`` left behind; returns their paths.

    POSIX only (it needs ``flock``); elsewhere nothing is removed.
    """
    if fcntl is None:
        return []
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"([0-9]{1,10})\.[a-z0-9_]{8}"
                         + re.escape(_PARTIAL_SUFFIX))
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _process_alive(int(m.group(1))):
            continue
        full = os.path.join(folder, name)
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its writer is still running (on another host)
                continue
            os.unlink(full)
            removed.append(full)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _write_all(fd: int, data: memoryview, path: str) -> None:
    """Write every byte of ``data`` (``os.write`` may write less than asked)."""
    if data.format != "B" or data.ndim != 1:
        data = data.cast("B")
    while data.nbytes:
        try:
            n = os.write(fd, data)
        except OSError as exc:
            raise _write_error(exc, path) from None
        data = data[n:]


def _write_error(exc: OSError, path: str) -> OSError:
    """A write failure (disk full, file too large, I/O error) that names the destination."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, f"{exc.strerror or exc} while writing; nothing was left at the "
                   "destination", path)


def _sync_folder(folder: str) -> None:
    """Make the rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished temporary file into place (never clobbering unless asked)."""
    os.chmod(tmp, 0o644 & ~_umask())
    if overwrite:
        os.replace(tmp, path)
        return
    exists = f"{path} exists (pass overwrite=True / --force to replace it)"
    try:
        os.link(tmp, path)  # atomic "create if absent": a file that appeared meanwhile survives
    except FileExistsError:
        raise FileExistsError(exists) from None
    except OSError:  # filesystems without hard links
        if os.path.exists(path):
            raise FileExistsError(exists) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
