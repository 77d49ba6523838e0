"""GGUF sources: a ``.gguf`` file, requantized or copied.

Only the header is read through the reader's mapping; each tensor's stored bytes are read later
with plain reads into fresh memory. Quantized tensors come back as :class:`GGMLTensor` (copied as
they are when their type does not change), metadata as :class:`RawValue` (every value keeps its
exact type), except the keys the writer regenerates.
"""

from __future__ import annotations

from typing import Any

import torch
from gguf import GGUFValueType

from ..quants import get_quant_type
from ..reader import GGUFFile
from ..serialize import RawValue
from ..shapes import COMFY_ORIG_SHAPE_PREFIX, RAW_SHAPE_SUFFIX, logical_shape
from ..tensor import GGMLTensor
from ..writer import SourceTensor
from . import Source, _read_tensor

# Metadata of a GGUF source that the writer regenerates for the new file.
_REGENERATED = {"general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment", "general.quantized_by"}


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
                assert dtype is not None  # unquantized: a plain torch dtype
                raw = _read_stored(path, info)
                return raw.view(dtype).reshape(shape)

            src.tensors.append(SourceTensor(name, shape, qt.torch_dtype, load, None, info.nbytes))
        else:
            def loadq(info=info, shape=shape) -> torch.Tensor:
                raw = _read_stored(path, info)
                return GGMLTensor(raw, info.qtype, shape)

            src.tensors.append(SourceTensor(name, shape, torch.float32, loadq, info.qtype,
                                            info.nbytes))
