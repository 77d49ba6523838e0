"""``convert``: a checkpoint (safetensors, sharded safetensors, .pt/.pth or GGUF) to a GGUF file.

Sources are opened by their headers only: every tensor's name, shape and dtype is known before any
data is read, the policy types every tensor, the GGUF header is written, then tensors are loaded,
quantized and written one at a time (memory ~ one source tensor, never the model). Output goes to a
temporary file renamed at the end; the source is opened read-only and never written.

Memory stays at about one tensor because nothing read stays resident: safetensors and GGUF tensors
are read with plain file reads into fresh memory, freed once written (a memory map would keep every
page it touched counted in the process's RSS until the end, growing to the whole model). A ``.pt``
checkpoint is loaded by ``torch.load(mmap=True)`` (its pickle decides the tensors' layout); after
each storage has been converted, its pages are released with ``madvise(MADV_DONTNEED)`` -- only
for storages found inside a private mapping of the source file (``/proc/self/maps``, Linux), where
that only drops clean copies of file pages that the kernel reads again if touched. Elsewhere they
stay mapped, as before.

Tied weights (two keys of a ``.pt`` or state dict sharing one storage) are written under each key
-- GGUF has no aliases -- but encoded once.

Keys are kept verbatim, so any architecture converts (a twin-backbone model like Ovi included);
known families are recognised only to record ``general.architecture``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from gguf import GGMLQuantizationType, GGUFValueType

from .errors import GGUFError, _safe
from .imatrix import Imatrix, load_imatrix
from .policy import QuantPolicy, source_qtype
from .quants import get_quant_type
from .reader import GGUFFile
from .shapes import COMFY_ORIG_SHAPE_PREFIX, RAW_SHAPE_SUFFIX, logical_shape
from .tensor import GGMLTensor
from .writer import RawValue, SourceTensor, WriteSummary, tensor_tie, write_model

__all__ = ["convert", "open_source", "Source", "SOURCE_METADATA_PREFIX"]

#: Text metadata of a safetensors/.pt source is recorded under this prefix.
SOURCE_METADATA_PREFIX = "source."

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
# Metadata of a GGUF source that the writer regenerates for the new file.
_REGENERATED = {"general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment", "general.quantized_by"}


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
    if dtype is None or dtype in (torch.uint8, torch.bool):
        raise GGUFError(f"dtype {_safe(raw, 40)} has no GGUF type (expected float or "
                        "int8/16/32/64)",
                        path=path, tensor=name)
    source_qtype(dtype)
    return dtype


# A safetensors header larger than this is refused (real ones are well under a few MB).
_MAX_SAFETENSORS_HEADER = 100 << 20
# More dims than this in a safetensors header entry are refused (real tensors have a handful).
_MAX_SAFETENSORS_DIMS = 64


def _safetensors_header(path: str) -> tuple[int, dict[str, Any]]:
    """(data start, header) of a safetensors file, checked against the file.

    Read here rather than through ``safetensors.safe_open``: that maps the whole file, so every
    tensor read stays resident in the process until the end, and a conversion would appear to hold
    the whole model. Reading each tensor with ``readinto`` keeps memory at one tensor.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise GGUFError(f"not a safetensors file: {size} bytes, too short for a header",
                            path=path)
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise GGUFError(f"not a safetensors file: header length {n} does not fit the "
                            f"{size}-byte file", path=path)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError) as exc:
            raise GGUFError(f"not a safetensors file: header is not JSON ({exc})", path=path) \
                from None
    if not isinstance(header, dict):
        raise GGUFError("not a safetensors file: header is not a JSON object", path=path)
    return 8 + n, header


def _safetensors_tensors(files: Iterable[str], only: Mapping[str, str] | None, src: Source
                         ) -> None:
    seen: dict[str, str] = {}
    for f in files:
        start, header = _safetensors_header(f)
        src.files.append(f)
        data_len = os.path.getsize(f) - start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise GGUFError("__metadata__ is not a JSON object", path=f)
        for k, v in meta.items():
            if k != "format":
                src.metadata[SOURCE_METADATA_PREFIX + str(k)] = str(v)
        spans = []
        for name, entry in header.items():
            if only is not None and only.get(name) != os.path.basename(f):
                continue
            if name in seen:
                raise GGUFError(f"tensor also in {seen[name]!r}", path=f, tensor=name)
            seen[name] = f
            try:
                raw, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = tuple(int(d) for d in shape)
                begin, end = int(begin), int(end)
                if len(shape) > _MAX_SAFETENSORS_DIMS:  # bounds the size product's cost
                    raise ValueError("too many dims")
            except (KeyError, TypeError, ValueError):
                raise GGUFError("malformed header entry (expected dtype, shape, data_offsets)",
                                path=f, tensor=name) from None
            dtype = _check_dtype(name, _SAFETENSORS_DTYPES.get(raw) if isinstance(raw, str)
                                 else None, str(raw), f)
            nbytes = math.prod(shape) * dtype.itemsize
            if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len \
                    or end - begin != nbytes:
                raise GGUFError(f"data_offsets [{begin}, {end}) do not hold {raw} {list(shape)} "
                                f"({nbytes} bytes) inside the {data_len}-byte data section",
                                path=f, tensor=name)
            spans.append((begin, end, name))
            src.tensors.append(SourceTensor(
                name, shape, dtype,
                (lambda f=f, o=start + begin, shape=shape, dtype=dtype: _read_tensor(f, o, shape,
                                                                                    dtype)),
                None, nbytes))
        spans.sort()
        for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise GGUFError(f"data overlaps tensor {_safe(n0)}", path=f, tensor=n1)
        # Write in the file's data order (reads stay sequential); safetensors sorts its header.
        rank = {name: i for i, (_b, _e, name) in enumerate(spans)}
        first = len(src.tensors) - len(spans)
        src.tensors[first:] = sorted(src.tensors[first:], key=lambda t: rank[t.name])
    if only is not None:
        missing = sorted(set(only) - set(seen))
        if missing:
            raise GGUFError(f"{len(missing)} tensor(s) of the index are missing from their shard, "
                            f"e.g. {_safe(missing[0])} (expected in {_safe(only[missing[0]])})",
                            path=src.path)


def _read_tensor(path: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype
                 ) -> torch.Tensor:
    """One tensor read from ``path`` at ``offset`` into fresh memory (little-endian data)."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel():
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(view) != len(view):
                raise GGUFError(f"file ended inside the tensor's data (offset {offset})", path=path)
    return out


def _open_sharded(folder: str, src: Source) -> None:
    indexes = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        raise GGUFError(f"more than one *.safetensors.index.json: {indexes}", path=folder)
    if not indexes:
        shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not shards:
            raise GGUFError("folder has no *.safetensors.index.json and no .safetensors files",
                            path=folder)
        _safetensors_tensors([os.path.join(folder, f) for f in shards], None, src)
        return
    index_path = os.path.join(folder, indexes[0])
    src.files.append(index_path)
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise GGUFError(f"not a safetensors index ({exc})", path=index_path) from None
    for k, v in (index.get("metadata") or {}).items():
        src.metadata[SOURCE_METADATA_PREFIX + str(k)] = str(v)
    shards: list[str] = []
    for shard in weight_map.values():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise GGUFError(f"shard {_safe(shard)} is not a file name in the index's folder",
                            path=index_path)
        if shard not in shards:
            shards.append(shard)
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            raise FileNotFoundError(f"{_safe(os.path.join(folder, shard), 400)}: shard named by "
                                    f"{index_path} is missing")
    _safetensors_tensors([os.path.join(folder, s) for s in shards], weight_map, src)
    # Keep the index's order (the author's), not the shards'.
    order = {name: i for i, name in enumerate(weight_map)}
    src.tensors.sort(key=lambda t: order[t.name])


def _torch_load(path: str) -> tuple[Any, bool]:
    """``(object, memory-mapped)`` of a torch checkpoint, loaded with ``weights_only=True`` only.

    ``weights_only=True`` is explicit, so no environment variable (``TORCH_FORCE_NO_WEIGHTS_ONLY_
    LOAD``) can turn it off: the unpickler builds tensors and plain containers and refuses any other
    global before anything is called. Every failure becomes a :class:`GGUFError` naming the file.
    """
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
        # Legacy (pre-zipfile) checkpoints cannot be memory-mapped: they load whole.
        return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(str(exc))
        raise GGUFError("refusing to load: the checkpoint holds objects other than tensors and "
                        "plain containers" + (f" ({detail})" if detail else "")
                        + "; nothing in it was executed (torch.load runs with weights_only=True "
                        "only)", path=path) from None
    except (OSError, MemoryError):  # the machine's problem, not the file's
        raise
    except Exception as exc:  # zip/pickle structure errors of a corrupt or foreign file
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise GGUFError(f"not a readable torch checkpoint: torch.load failed with "
                        f"{type(exc).__name__}" + (f": {_safe(first, 300)}" if first else ""),
                        path=path) from None


def _unpickling_detail(message: str) -> str:
    """The one line of torch's weights-only refusal that says what was refused.

    The rest of torch's message suggests ``weights_only=False`` -- wrong advice for an untrusted
    file -- and may hold ANSI escapes; only the detail is kept, escaped.
    """
    for marker in ("WeightsUnpickler error:", "Trying to load"):
        i = message.rfind(marker)
        if i < 0:
            continue
        rest = message[i + len(marker):] if marker.endswith(":") else message[i:]
        line = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
        return _safe(line.split(" Please use")[0], 300)
    return ""


def _open_torch(path: str, src: Source) -> None:
    src.files.append(path)
    obj, mapped = _torch_load(path)
    if not mapped:
        src.notes.append("legacy .pt format: loaded whole into memory (no mmap)")
    if not isinstance(obj, Mapping):
        raise GGUFError(f"expected a state dict (a mapping of tensors), found {type(obj).__name__}",
                        path=path)
    for wrapper in ("state_dict", "model", "module", "model_state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()) \
                and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            src.notes.append(f"tensors taken from the checkpoint's {wrapper!r} entry")
            obj = inner
            break
    skipped = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        entries = "entry" if len(skipped) == 1 else "entries"
        more = " ..." if len(skipped) > 5 else ""
        src.notes.append(f"skipped {len(skipped)} non-tensor {entries}: "
                         f"{', '.join(_safe(k, 100) for k in skipped[:5])}{more}")
    # Pages of a checkpoint of the other byte order were byte-swapped in place by torch.load
    # (private copies): dropping them would bring back the unswapped file bytes. Never released.
    mapped_ranges = _mapped_ranges(path) if mapped and _byteorder(path) == sys.byteorder else []
    seen_ties: set[Any] = set()
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            continue
        if not isinstance(name, str):
            raise GGUFError(f"state dict key {_safe(repr(name))} is not a string", path=path)
        _check_dtype(name, t.dtype if t.dtype not in (torch.uint8, torch.bool) else None,
                     str(t.dtype), path)
        tie = tensor_tie(t)
        nbytes = 0 if tie in seen_ties else t.numel() * t.element_size()
        if tie is not None:
            seen_ties.add(tie)
        src.tensors.append(SourceTensor(name, tuple(t.shape), t.dtype, (lambda t=t: t), None,
                                        nbytes, tie, _page_releaser(t, mapped_ranges)))


# -- giving back the pages of a memory-mapped .pt ---------------------------------------------


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges ``[start, end)`` of this process's private mappings of ``path``.

    Read from ``/proc/self/maps`` (Linux); elsewhere ``[]``, and nothing is ever released. A
    mapping is recognised by the file's device and inode, or by its path.
    """
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return []
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 5 or len(parts[1]) < 4 or parts[1][3] != "p":
            continue
        try:
            start, end = (int(a, 16) for a in parts[0].split("-"))
            major, minor = (int(d, 16) for d in parts[3].split(":"))
            inode = int(parts[4])
        except ValueError:
            continue
        same_file = (inode == st.st_ino and os.makedev(major, minor) == st.st_dev) or \
            (len(parts) == 6 and parts[5].rstrip("\n") == real)
        if same_file:
            out.append((start, end))
    return out


def _byteorder(path: str) -> str | None:
    """The byte order a zip-format torch checkpoint records (``little`` when it records none, as
    torch assumes), or ``None`` when it cannot be told."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/byteorder") or n == "byteorder"]
            if not names:
                return "little"
            return z.read(names[0]).decode("ascii", "replace").strip()
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


_madvise: Any = None


def _page_releaser(t: torch.Tensor, ranges: list[tuple[int, int]]) -> Callable[[], None] | None:
    """A function dropping the resident pages of ``t``'s storage, or ``None`` when the storage is
    not inside a private mapping of the source (then releasing could lose data)."""
    if not ranges or t.numel() == 0:
        return None
    try:
        storage = t.untyped_storage()
        begin, size = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None
    page = mmap.PAGESIZE
    for start, end in ranges:
        if start <= begin and begin + size <= end:
            # Whole pages covering the storage, within the mapping: neighbours' pages dropped
            # too are clean file pages, read again from the file if they are used later.
            lo = begin - (begin - start) % page
            hi = min(end, -(-(begin + size) // page) * page)
            return lambda lo=lo, n=hi - lo: _dontneed(lo, n)
    return None


def _dontneed(address: int, length: int) -> None:
    global _madvise
    if _madvise is None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    # Advice only: a failure leaves the pages resident, which costs memory, not correctness.
    _madvise(address, length, mmap.MADV_DONTNEED)


def _read_bytes(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(n)


def _read_stored(path: str, info: Any) -> torch.Tensor:
    """A GGUF tensor's stored bytes read into fresh memory, shaped like
    :meth:`GGUFFile.tensor_data`: ``(*shape[:-1], row_bytes)``."""
    shape = tuple(info.shape) or (1,)
    row_bytes = get_quant_type(info.qtype).row_bytes(shape[-1]) if shape[-1] else 0
    if info.nbytes == 0:
        return torch.empty((*shape[:-1], row_bytes), dtype=torch.uint8)
    return _read_tensor(path, info.offset, (info.nbytes,), torch.uint8).view(*shape[:-1],
                                                                              row_bytes)


def _open_gguf(path: str, src: Source) -> None:
    src.files.append(path)
    with GGUFFile(path) as g:
        _gguf_tensors(g, path, src)


def _gguf_tensors(g: GGUFFile, path: str, src: Source) -> None:
    # Only the header is read through the mapping; tensors are read with plain reads (see the
    # module's docstring), so the file can be closed once the header is parsed.
    shape_keys = set()
    for name in g.tensors:
        shape_keys.add(COMFY_ORIG_SHAPE_PREFIX + name)
        shape_keys.add(name + RAW_SHAPE_SUFFIX)
    arch = g.fields.get("general.architecture")
    if arch is not None and arch.type == GGUFValueType.STRING:
        src.architecture = str(g.metadata["general.architecture"])
    for key, f in g.fields.items():
        if key in _REGENERATED or key in shape_keys:
            continue
        # Copied as encoded: every value keeps its exact type.
        src.metadata[key] = RawValue(f.type, _read_bytes(path, f.offset, f.nbytes))
    for name, info in g.tensors.items():
        shape = tuple(logical_shape(g, info))
        qt = get_quant_type(info.qtype)
        if qt.torch_dtype is not None:
            def load(info=info, shape=shape) -> torch.Tensor:
                dtype = get_quant_type(info.qtype).torch_dtype
                raw = _read_stored(path, info)
                return raw.view(dtype).reshape(shape)

            src.tensors.append(SourceTensor(name, shape, qt.torch_dtype, load, None, info.nbytes))
        else:
            def loadq(info=info, shape=shape) -> torch.Tensor:
                raw = _read_stored(path, info)
                return GGMLTensor(raw, info.qtype, shape)

            src.tensors.append(SourceTensor(name, shape, torch.float32, loadq, info.qtype,
                                            info.nbytes))


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
    if not src.tensors:
        raise GGUFError("the source holds no tensors", path=p)
    return src


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            qtype: str | GGMLQuantizationType | None = "Q4_K", policy: QuantPolicy | None = None,
            overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
            keep: Iterable[str] = (), force: bool = False, progress: bool = False,
            metadata: Mapping[str, Any] | None = None, architecture: str | None = None,
            device: torch.device | str | None = None,
            imatrix: str | os.PathLike[str] | Imatrix | None = None,
            imatrix_rename: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> WriteSummary:
    """Convert a checkpoint to GGUF.

    Args:
        src: a ``.safetensors`` file, a folder with ``*.safetensors.index.json`` (or just
            ``.safetensors`` shards), a ``.pt``/``.pth`` state dict, or a ``.gguf`` (requantized:
            tensors already of the decided type are copied unchanged).
        dst: the GGUF file to write.
        qtype: a ggml type (``"Q4_K"``, ``"Q8_0"``, ``"BF16"``...), a preset (``"Q4_K_M"``,
            ``"Q5_K_M"``...) or ``None`` (keep every tensor's precision).
        policy: a full :class:`QuantPolicy` instead of ``qtype``/``overrides``/``keep``.
        overrides: regex -> type (or ``"keep"``), first match wins.
        keep: extra regexes of tensors kept at high precision.
        force: replace an existing ``dst``.
        progress: show a tqdm progress bar (tensors and bytes).
        metadata: extra metadata for the file.
        architecture: ``general.architecture`` (default: the source's, else detected).
        device: where quantization runs (``"cuda"`` for speed; default CPU).
        imatrix: an importance matrix -- a file written by llama.cpp's ``imatrix`` tool (GGUF or
            legacy ``.dat``, see :mod:`ggufvideo.imatrix`) or a loaded :class:`Imatrix`. Each
            entry applies to the tensor of the same name when it is quantized to a type that uses
            one (K-quants, IQ4_NL/IQ4_XS, Q4_0/Q4_1/Q5_0/Q5_1); other tensors, and tensors without
            an entry, are quantized without. The file and its dataset are recorded in the output's
            ``quantize.imatrix.*`` metadata, as llama.cpp does.
        imatrix_rename: ``(regex, replacement)`` rules applied in order (``re.sub``) to the
            matrix's entry names before matching them to the source's tensor names, for a matrix
            computed on a differently named copy of the model: ``[("^", "model.diffusion_model.")]``
            adds a prefix, ``[(r"^model\\.diffusion_model\\.", "")]`` removes one.

    Returns:
        A :class:`~ggufvideo.writer.WriteSummary`; ``str()`` of it is the human summary.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        FileExistsError: ``dst`` exists and ``force`` is false.
        GGUFError: ``dst`` is the source, an unreadable source, or a tensor that cannot be
            written as asked (each message names the file and the tensor).
        ImatrixError: an unreadable importance matrix, or an entry whose length does not fit its
            tensor's rows (a :class:`GGUFError`; raised before anything is written).
    """
    if policy is None:
        policy = QuantPolicy.from_type(qtype, overrides=overrides, keep=keep)
    elif overrides or keep:
        raise ValueError("pass overrides/keep through the policy when giving one")
    dst = os.fspath(dst)
    srcp = os.fspath(src)
    if not os.path.exists(srcp):
        raise FileNotFoundError(f"{srcp}: no such file or folder")
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists (use --force / force=True to replace it)")
    imat = None
    if imatrix is not None:
        imat = imatrix if isinstance(imatrix, Imatrix) else load_imatrix(imatrix)
        if imatrix_rename:
            imat = imat.renamed(imatrix_rename)
    elif imatrix_rename:
        raise ValueError("imatrix_rename given without an imatrix")
    source = open_source(srcp)
    meta: dict[str, Any] = {}
    if source.kind != "gguf":
        base = os.path.basename(os.path.normpath(srcp))
        meta["general.name"] = base.rsplit(".", 1)[0] if not os.path.isdir(srcp) else base
    meta.update(source.metadata)
    if imat is not None:
        # A requantized GGUF may carry the keys of the matrix it was made with: replaced whole.
        for k in [k for k in meta if k.startswith("quantize.imatrix.")]:
            del meta[k]
        meta.update(imat.metadata())
    meta.update(metadata or {})
    try:
        summary = write_model(source.tensors, dst, policy=policy, metadata=meta,
                              architecture=architecture or source.architecture, requantize=True,
                              overwrite=force, progress=progress, protect=source.files,
                              device=device, imatrix=imat)
    finally:
        # Dropped, not closed: a mapping must outlive any tensor view still referenced (by a
        # traceback, say); the garbage collector releases it after the views.
        source._keep_open.clear()
    summary.notes.extend(source.notes)
    if imat is not None:
        names = {t.name for t in source.tensors}
        unmatched = [n for n in imat.entries if n not in names]
        if unmatched:
            summary.notes.append(
                f"{len(unmatched)} of {len(imat)} imatrix entries name no tensor of the source "
                f"(e.g. {_safe(unmatched[0])}); if the names differ by a prefix, map them with "
                "--imatrix-rename / imatrix_rename")
    return summary
