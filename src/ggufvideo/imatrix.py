"""Importance matrices: llama.cpp's ``imatrix`` files, read for the quantizer.

An importance matrix gives, for each weight tensor, one non-negative weight per input column (per
position of a row): the mean of the squared activations that column saw on calibration data. The
quantizer's searches minimise the error weighted by it (``ggufvideo.quantize(..., imatrix=)``),
which is what llama.cpp's ``llama-quantize --imatrix`` does. Both formats that llama.cpp's
``tools/imatrix`` writes are read; the format is told by the first four bytes (``GGUF`` or not).

GGUF format (the default since 2025)
    A GGUF file with ``general.type = "imatrix"`` and, for each weight ``<name>``, two F32 tensors:
    ``<name>.in_sum2`` with ggml dims ``[n_per_row, n_mat]`` (the sums of squared activations per
    column, one row per matrix: ``n_mat`` > 1 for merged-expert 3-D weights) and ``<name>.counts``
    with dims ``[1, n_mat]`` (how many activation rows each matrix saw). Other tensors (``.in_sum``,
    the plain sums) are ignored. Metadata: ``imatrix.datasets`` (array of strings),
    ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32). The weights are
    ``in_sum2 / count`` per matrix in float32, or 1 for a matrix whose count is 0 (an expert the
    calibration data never reached), exactly as llama.cpp's quantizer computes them.

Legacy binary format (``.dat``; little-endian)
    ``i32 n_entries``, then per entry ``i32 name_length``, the name's bytes, ``i32 ncall``,
    ``i32 nval`` and ``nval`` float32 values; optionally followed by ``i32 chunk_count`` and
    ``i32 dataset_length`` + the dataset name's bytes (stable-diffusion.cpp writes the chunk count
    alone; a zero length names no dataset). The stored values are already means scaled
    by ``ncall``: the weights are ``value / ncall`` in float32 (``value`` itself when ``ncall`` is
    0), as llama.cpp's quantizer computes them. Merged experts are stored flattened
    (``nval = n_per_row * n_mat``).

Entries are keyed by the weight's name in the model the matrix was computed on;
:meth:`Imatrix.renamed` maps them onto another naming (a prefix, say) with regular-expression
substitutions. llama.cpp names them as its GGUF does (``blk.0.attn_q.weight``);
stable-diffusion.cpp, which computes them for diffusion models in the legacy format, uses its own
names with a ``model.diffusion_model.`` prefix, which ``[(r"^model\\.diffusion_model\\.", "")]``
removes for a checkpoint named without it.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from .errors import GGUFError, _safe
from .reader import GGUFFile
from .serialize import TypedValue

__all__ = [
    "Imatrix",
    "ImatrixError",
    "load_imatrix",
    "USES_IMATRIX",
    "IMATRIX_METADATA_KEYS",
]

_T = GGMLQuantizationType
#: Types whose ggml quantizer uses an importance matrix when given one. Q8_0, the float types and
#: the others ignore it (ggml's ``quantize_q8_0`` takes the weights and drops them).
USES_IMATRIX: frozenset[GGMLQuantizationType] = frozenset({
    _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
    _T.IQ4_NL, _T.IQ4_XS,
})

#: The metadata keys llama.cpp's quantizer writes into a model quantized with an importance matrix
#: (``tools/quantize``): the file as given, the first dataset, the number of entries, the chunks.
IMATRIX_METADATA_KEYS = {
    "file": "quantize.imatrix.file",
    "dataset": "quantize.imatrix.dataset",
    "entries": "quantize.imatrix.entries_count",
    "chunks": "quantize.imatrix.chunks_count",
}

_SUM2_SUFFIX = ".in_sum2"
_COUNTS_SUFFIX = ".counts"
# More entries than this in a legacy header is not a real file (models have thousands at most);
# refusing early keeps a corrupt count from driving a long loop.
_MAX_LEGACY_ENTRIES = 1 << 24


class ImatrixError(GGUFError):
    """An importance-matrix file is malformed, truncated, or does not fit the model."""


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix, ready for the quantizer.

    Attributes:
        path: the file read.
        format: ``"gguf"`` or ``"legacy"``.
        entries: weight name -> float32 1-D tensor of ``n_mat * n_per_row`` weights (matrix after
            matrix): the values handed to ggml's quantizer, never negative or non-finite.
        datasets: the calibration datasets the file names (possibly none).
        chunks: the number of chunks it was computed on (0 when the file does not say).
        renames: the ``(regex, replacement)`` rules applied by :meth:`renamed`, in order.
    """

    path: str
    format: str
    entries: dict[str, torch.Tensor]
    datasets: tuple[str, ...] = ()
    chunks: int = 0
    renames: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def renamed(self, rules: Iterable[tuple[str, str]] | Mapping[str, str]) -> Imatrix:
        """The same matrix with each entry's name rewritten by ``re.sub(regex, replacement)``,
        rule after rule: e.g. ``[("^", "model.diffusion_model.")]`` adds a prefix,
        ``[(r"^model\\.diffusion_model\\.", "")]`` removes one.

        Raises:
            ImatrixError: a rule is not a valid regular expression, or two entries end up with
                the same name.
        """
        pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
        compiled = []
        for regex, repl in pairs:
            try:
                compiled.append((re.compile(regex), repl))
            except re.error as exc:
                raise ImatrixError(f"imatrix rename rule {_safe(regex)!r}: not a regular "
                                   f"expression ({exc})", path=self.path) from None
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for name, values in self.entries.items():
            new = name
            for rx, repl in compiled:
                try:
                    new = rx.sub(repl, new)
                except (re.error, IndexError) as exc:
                    raise ImatrixError(f"imatrix rename rule {_safe(rx.pattern)!r} -> "
                                       f"{_safe(repl)!r}: bad replacement ({exc})",
                                       path=self.path) from None
            if new in out:
                raise ImatrixError(f"imatrix entries {_safe(origin[new])!r} and {_safe(name)!r} "
                                   f"are both renamed to {_safe(new)!r}", path=self.path)
            out[new] = values
            origin[new] = name
        return Imatrix(self.path, self.format, out, self.datasets, self.chunks,
                       self.renames + tuple((rx.pattern, repl) for rx, repl in compiled))

    def weights_for(self, name: str, stored_shape: tuple[int, ...]) -> torch.Tensor | None:
        """The weights for tensor ``name`` stored with ``stored_shape`` (rows last), as float32
        ``(n_mat, n_per_row)``: one row shared by every row of the tensor (``n_mat`` = 1), or, for
        a 3-D tensor, one per matrix along its first dim (llama.cpp's merged experts). ``None``
        when the matrix has no entry for ``name``.

        Raises:
            ImatrixError: the entry's length is neither the tensor's row length nor, for a 3-D
                tensor, row length x matrices (the message names the tensor and both lengths).
        """
        values = self.entries.get(name)
        if values is None:
            return None
        row = stored_shape[-1] if stored_shape else 1
        n = values.numel()
        if n == row:
            return values.reshape(1, row)
        if len(stored_shape) == 3 and n == row * stored_shape[0]:
            return values.reshape(stored_shape[0], row)
        expected = f"{row} (the tensor's row length)"
        if len(stored_shape) == 3:
            expected += f" or {row * stored_shape[0]} ({stored_shape[0]} matrices x {row})"
        raise ImatrixError(f"importance-matrix entry has {n} values, expected {expected}; "
                           f"tensor shape as stored {list(stored_shape)}",
                           path=self.path, tensor=name)

    def metadata(self) -> dict[str, Any]:
        """The GGUF metadata llama.cpp's quantizer records for a model quantized with this matrix
        (``quantize.imatrix.*``: the file, the first dataset, entries and chunks as UINT32)."""
        meta: dict[str, Any] = {IMATRIX_METADATA_KEYS["file"]: self.path}
        if self.datasets:
            meta[IMATRIX_METADATA_KEYS["dataset"]] = self.datasets[0]
        meta[IMATRIX_METADATA_KEYS["entries"]] = TypedValue(GGUFValueType.UINT32,
                                                           len(self.entries))
        if self.chunks > 0:
            meta[IMATRIX_METADATA_KEYS["chunks"]] = TypedValue(GGUFValueType.UINT32, self.chunks)
        return meta


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance-matrix file written by llama.cpp's ``imatrix`` tool (either format).

    Raises:
        FileNotFoundError: no such file.
        ImatrixError: the file is not an importance matrix, is truncated, or holds invalid values
            (the message names the file, the entry and what is wrong).
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ImatrixError("is a folder, expected an imatrix file (.gguf or .dat)", path=p)
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return _load_gguf(p)
    with open(p, "rb") as fh:
        data = fh.read()
    return _load_legacy(p, data)


def _checked(values: np.ndarray, path: str, name: str) -> torch.Tensor:
    """float32 weights as a torch tensor, refused when non-finite or negative."""
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ImatrixError(f"weight {i} is {values[i]} (weights must be finite)", path=path,
                           tensor=name)
    neg = values < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ImatrixError(f"weight {i} is {values[i]} (weights must be >= 0)", path=path,
                           tensor=name)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


# -- legacy binary format ---------------------------------------------------------------------


class _Bytes:
    """A cursor over the legacy file's bytes that names what it was reading when they ran out."""

    def __init__(self, data: bytes, path: str) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise ImatrixError(f"truncated: the file ends inside {what} (needs {n} bytes at "
                               f"offset {self.pos}, {len(self.data) - self.pos} left)",
                               path=self.path)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_legacy(path: str, data: bytes) -> Imatrix:
    if len(data) < 4:
        raise ImatrixError(f"not an imatrix file: {len(data)} bytes, too short for the entry "
                           "count of the legacy format (and no GGUF magic)", path=path)
    cur = _Bytes(data, path)
    n_entries = cur.i32("the entry count")
    # Each entry needs at least 4+1+4+4+4 bytes: bounds a corrupt count before looping on it.
    if n_entries < 1 or n_entries > min(_MAX_LEGACY_ENTRIES, (len(data) - 4) // 17):
        raise ImatrixError(f"not an imatrix file: legacy header says {n_entries} entries, "
                           f"impossible for a {len(data)}-byte file (expected 1 or more, each at "
                           "least 17 bytes)", path=path)
    entries: dict[str, torch.Tensor] = {}
    for i in range(n_entries):
        what = f"entry {i + 1} of {n_entries}"
        length = cur.i32(f"the name length of {what}")
        if length < 1:
            raise ImatrixError(f"{what}: name length {length} (expected >= 1)", path=path)
        raw = cur.take(length, f"the name of {what}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixError(f"{what}: name is not UTF-8 ({_safe(repr(raw[:60]))})",
                               path=path) from None
        ncall = cur.i32(f"the call count of {what}")
        nval = cur.i32(f"the value count of {what}")
        if nval < 1:
            raise ImatrixError(f"{what}: {nval} values (expected >= 1)", path=path, tensor=name)
        if name in entries:
            raise ImatrixError(f"{what}: the name appears twice", path=path, tensor=name)
        values = np.frombuffer(cur.take(4 * nval, f"the {nval} values of {what}"), dtype="<f4")
        if ncall > 0:
            # llama.cpp's quantizer divides the stored float by the call count in float32.
            values = values / np.float32(ncall)
        entries[name] = _checked(values.astype(np.float32), path, name)

    datasets: tuple[str, ...] = ()
    chunks = 0
    rest = len(data) - cur.pos
    if rest:
        # The trailer of newer legacy files: chunk count, then the dataset's name.
        if rest < 4:
            raise ImatrixError(f"truncated: {rest} byte(s) after the last entry, too few for the "
                               "chunk count (4 bytes)", path=path)
        chunks = cur.i32("the chunk count")
        if rest > 4:
            length = cur.i32("the dataset name's length")
            if length < 0:
                raise ImatrixError(f"dataset name length {length} (expected >= 0)", path=path)
            raw = cur.take(length, "the dataset name")
            # llama.cpp's imatrix tool writes a zero length when it had no prompt file; its
            # loader (common_imatrix_load_legacy) then records no dataset, so neither do we.
            if raw:
                datasets = (raw.decode("utf-8", errors="replace"),)
            if cur.pos != len(data):
                raise ImatrixError(f"{len(data) - cur.pos} unexpected byte(s) after the dataset "
                                   "name at the end of the file", path=path)
    return Imatrix(path, "legacy", entries, datasets, max(chunks, 0))


# -- GGUF format ----------------------------------------------------------------------------------


def _load_gguf(path: str) -> Imatrix:
    try:
        g = GGUFFile(path)
    except GGUFError as exc:
        raise ImatrixError(f"not a readable imatrix GGUF file: {exc.reason}", path=path) from None
    try:
        return _gguf_entries(g, path)
    finally:
        g.close()


def _gguf_entries(g: Any, path: str) -> Imatrix:
    pairs: dict[str, list[Any]] = {}
    for tname, info in g.tensors.items():
        for suffix, slot in ((_SUM2_SUFFIX, 0), (_COUNTS_SUFFIX, 1)):
            if tname.endswith(suffix) and len(tname) > len(suffix):
                pairs.setdefault(tname[:-len(suffix)], [None, None])[slot] = info
    if not pairs:
        kind = g.metadata.get("general.type") if "general.type" in g.fields else None
        raise ImatrixError("not an imatrix file: no '<name>.in_sum2' / '<name>.counts' tensors "
                           f"(general.type is {_safe(kind)!r})", path=path)

    entries: dict[str, torch.Tensor] = {}
    for name, (sums, counts) in sorted(pairs.items()):
        if sums is None or counts is None:
            missing = _SUM2_SUFFIX if sums is None else _COUNTS_SUFFIX
            raise ImatrixError(f"has no matching {missing!r} tensor (each entry needs "
                               "'.in_sum2' and '.counts')", path=path, tensor=name)
        for info in (sums, counts):
            if info.qtype != GGMLQuantizationType.F32:
                raise ImatrixError(f"{_safe(info.name)} is {info.qtype.name}, expected F32",
                                   path=path, tensor=name)
        # ggml drops trailing dims of 1 when writing: one matrix is stored 1-D.
        if len(sums.shape) not in (1, 2) or 0 in sums.shape:
            raise ImatrixError(f"in_sum2 has shape {list(sums.shape)}, expected [n_mat, "
                               "n_per_row] (PyTorch order)", path=path, tensor=name)
        n_mat, n_per_row = (1, sums.shape[0]) if len(sums.shape) == 1 else tuple(sums.shape)
        if len(counts.shape) not in (1, 2) or math.prod(counts.shape) != n_mat \
                or (len(counts.shape) == 2 and counts.shape[1] != 1):
            raise ImatrixError(f"counts has shape {list(counts.shape)}, expected [{n_mat}, 1] "
                               f"(one count per matrix of in_sum2 {list(sums.shape)})",
                               path=path, tensor=name)
        s = g.tensor_data(sums).view(torch.float32).numpy().reshape(n_mat, n_per_row)
        c = g.tensor_data(counts).view(torch.float32).numpy().reshape(n_mat, 1)
        if not np.isfinite(c).all() or (c < 0).any():
            raise ImatrixError(f"counts {c.reshape(-1)[:8].tolist()} must be finite and >= 0",
                               path=path, tensor=name)
        # Per matrix: sums / count in float32, or 1 where the count is 0 (llama.cpp's rule).
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1))
        entries[name] = _checked(values.astype(np.float32).reshape(-1), path, name)

    datasets: tuple[str, ...] = ()
    f = g.fields.get("imatrix.datasets")
    if f is not None:
        if f.type != GGUFValueType.ARRAY or (f.item_type != GGUFValueType.STRING and f.count):
            raise ImatrixError("metadata imatrix.datasets is not an array of strings", path=path)
        if f.count:  # an empty array says nothing, whatever its item type
            datasets = tuple(str(d) for d in g.metadata["imatrix.datasets"])
    chunks = 0
    f = g.fields.get("imatrix.chunk_count")
    if f is not None:
        value = g.metadata["imatrix.chunk_count"]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ImatrixError(f"metadata imatrix.chunk_count is {_safe(repr(value))}, expected "
                               "a non-negative integer", path=path)
        chunks = int(value)
    return Imatrix(path, "gguf", entries, datasets, chunks)
