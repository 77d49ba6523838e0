"""Checkpoint sources: a checkpoint opened by its headers, its tensors' data read one at a time.

:func:`open_source` opens a ``.safetensors`` file, a folder of safetensors shards, a ``.pt``/
``.pth`` state dict or a ``.gguf`` (one module per kind: :mod:`.safetensors`, :mod:`.torch_pickle`,
:mod:`.gguf`) into a :class:`Source`: every tensor's name, shape and dtype is known before any data
is read, so the policy can type every tensor and the GGUF header can be written first; each
tensor's data is then loaded only when its turn comes (:func:`ggufvideo.convert`).

Memory stays at about one tensor because nothing read stays resident: safetensors and GGUF tensors
are read with plain file reads into fresh memory, freed once written (a memory map would keep every
page it touched counted in the process's RSS until the end, growing to the whole model). ``.pt``
checkpoints are memory-mapped by ``torch.load`` and their pages given back after each tensor
(:mod:`.torch_pickle`). Sources are opened read-only and never written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GGUFError, _safe
from ..policy import source_qtype
from ..writer import SourceTensor

__all__ = ["SOURCE_METADATA_PREFIX", "Source", "open_source"]

#: Text metadata of a safetensors/.pt source is recorded under this prefix.
SOURCE_METADATA_PREFIX = "source."


@dataclass
class Source:
    """An opened checkpoint: its tensors (headers, lazy data), metadata and architecture.

    Attributes:
        path: the source path.
        kind: ``"safetensors"``, ``"sharded"``, ``"torch"`` or ``"gguf"``.
        tensors: the tensors, in file order.
        metadata: metadata to carry into the GGUF file.
        architecture: the source's own ``general.architecture`` (GGUF sources), else ``None``.
        files: every file read (protected from being overwritten).
        notes: things the summary should mention (skipped entries, full loads).
    """

    path: str
    kind: str
    tensors: list[SourceTensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _keep_open: list[Any] = field(default_factory=list, repr=False)


def _check_dtype(name: str, dtype: torch.dtype | None, raw: str, path: str) -> torch.dtype:
    """``dtype`` if GGUF can store it; uint8 passes here and is judged once scales are folded
    (:mod:`.scaled`: ComfyUI keeps fp8 values and format records in uint8 tensors)."""
    if dtype == torch.uint8:
        return dtype
    if dtype is None or dtype == torch.bool:
        raise GGUFError(f"dtype {_safe(raw, 40)} has no GGUF type (expected float or "
                        "int8/16/32/64)",
                        path=path, tensor=name)
    source_qtype(dtype)
    return dtype


def _read_tensor(path: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype
                 ) -> torch.Tensor:
    """One tensor read from ``path`` at ``offset`` into fresh memory (little-endian data)."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel():
        view = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(view) != len(view):
                raise GGUFError(f"file ended inside the tensor's data (offset {offset})", path=path)
    return out


def open_source(path: str | os.PathLike[str]) -> Source:
    """Open a checkpoint by its headers: ``.safetensors``, a folder of shards, ``.pt``/``.pth``/
    ``.bin``/``.ckpt`` (``torch.load(weights_only=True)`` only) or ``.gguf``.

    Raises:
        FileNotFoundError: no such file or folder, or a shard the index names is missing.
        GGUFError: an unknown kind of file, a malformed index or header, an unsafe pickle, a dtype
            GGUF cannot store.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    # Imported here: each kind's module imports Source and the helpers above from this package.
    from .gguf import _open_gguf
    from .safetensors import _open_sharded, _safetensors_tensors
    from .scaled import fold_scales
    from .torch_pickle import _open_torch

    lower = p.lower()
    if os.path.isdir(p):
        src = Source(p, "sharded", [])
        _open_sharded(p, src)
    elif lower.endswith(".safetensors"):
        src = Source(p, "safetensors", [])
        _safetensors_tensors([p], None, src)
    elif lower.endswith((".pt", ".pth", ".bin", ".ckpt")):
        src = Source(p, "torch", [])
        _open_torch(p, src)
    elif lower.endswith(".gguf"):
        src = Source(p, "gguf", [])
        _open_gguf(p, src)
    else:
        raise GGUFError("unknown source format: expected .safetensors, a folder of safetensors "
                        "shards, .pt/.pth/.bin/.ckpt or .gguf", path=p)
    if src.kind != "gguf":
        src.tensors, notes = fold_scales(src.tensors, src.metadata, p, SOURCE_METADATA_PREFIX)
        src.notes.extend(notes)
    for t in src.tensors:
        if t.dtype == torch.uint8:
            raise GGUFError("dtype uint8 has no GGUF type (expected float or int8/16/32/64)",
                            path=p, tensor=t.name)
    if not src.tensors:
        raise GGUFError("the source holds no tensors", path=p)
    return src
