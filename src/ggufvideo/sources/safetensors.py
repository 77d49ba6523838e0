"""Safetensors sources: one ``.safetensors`` file, or a folder of shards (with or without its
``*.safetensors.index.json``).

Headers are parsed here rather than through ``safetensors.safe_open`` (which maps the whole file):
every entry is checked against the file (offsets inside the data section, sizes matching dtype and
shape, no overlaps) and each tensor is later read with a plain ``readinto`` into fresh memory.
Tensors are listed in the file's data order (reads stay sequential), or the index's order for a
sharded folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import GGUFError, _safe
from ..writer import SourceTensor
from . import SOURCE_METADATA_PREFIX, Source, _check_dtype, _read_tensor

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}

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
                                                                                    dtype)),  # type: ignore[misc]
                None, nbytes))
        spans.sort()
        for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
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


# diffusers saves weight variants beside the main files: "model.fp16.safetensors"
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|fp8[a-z0-9_]*)\.safetensors\Z", re.IGNORECASE)


def _one_variant(files: list[str], folder: str, src: Source) -> list[str]:
    """The files of one weight variant: the plain ones where there are any (the others noted),
    else the only variant; several variants and no plain files are an error naming them."""
    plain = [f for f in files if not _VARIANT.search(f)]
    variants = sorted({m.group(1).lower() for f in files if (m := _VARIANT.search(f))})
    if plain:
        if variants:
            src.notes.append(f"weight variant file(s) {', '.join(variants)} beside the main "
                             "ones were not read")
        return plain
    if len(variants) > 1:
        raise GGUFError(f"the folder holds weight variants {', '.join(variants)} and no main "
                        "files: pass one file (or a folder with one variant)", path=folder)
    return files


def _open_sharded(folder: str, src: Source) -> None:
    indexes = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
    if len(indexes) > 1:
        raise GGUFError(f"more than one *.safetensors.index.json: {indexes}", path=folder)
    if not indexes:
        shards = _one_variant(sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")),
                              folder, src)
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
    shards = []
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
