"""``load_state_dict``: a GGUF file as a ``{name: tensor}`` dict, decoded or kept quantized."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch

from .quants import dequantize, get_quant_type
from .reader import GGUFFile, TensorInfo
from .shapes import logical_shape
from .tensor import GGMLTensor

__all__ = ["load_state_dict", "read_tensors", "file_architecture", "resolve_dtype",
           "resolve_device", "DTypeLike"]

DTypeLike = torch.dtype | str | None

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: DTypeLike, device: torch.device | str | None = None) -> torch.dtype | None:
    """Turn a precision choice into a torch dtype.

    Accepts a floating ``torch.dtype``, ``None`` (keep), or a name: ``"auto"`` (bfloat16 where
    ``device`` supports it, else float16), ``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``/
    ``"half"``, ``"bfloat16"``/``"bf16"``.

    This is the one meaning of ``"auto"`` in ggufvideo: :func:`load_state_dict`,
    :func:`ggufvideo.load_model`, :func:`ggufvideo.from_gguf` and the ComfyUI nodes' precision
    choice (resolved for ComfyUI's compute device) all resolve it here.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch.dtype, a name or None, got {type(dtype).__name__}")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        dev = torch.device(device if device is not None else "cpu")
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto', 'float32', 'float16' or "
                         "'bfloat16' (or a torch.dtype)") from None


def resolve_device(device: torch.device | str) -> torch.device:
    """``device`` as the tensors on it report it: an accelerator without an index gets the current
    one (``"cuda"`` -> ``cuda:0``), the CPU none (``"cpu:0"`` -> ``cpu``).

    ``torch.device("cuda") != torch.device("cuda:0")``, and a tensor on the GPU reports the
    latter: a check "is it there yet?" against the index-less one moves every tensor to where it
    already is (a dispatch per tensor, ~30 ms for 582 tensors on a GPU host). Where the device
    cannot be reached (no CUDA in this PyTorch) it is returned as given, for the caller to report.
    """
    dev = torch.device(device)
    if dev.type == "cpu":
        return torch.device("cpu")  # "cpu:0" too: CPU tensors report no index
    if dev.index is not None or dev.type == "meta":
        return dev
    try:
        return torch.empty(0, device=dev).device
    except (RuntimeError, AssertionError):  # not compiled in, no such device: caller's error
        return dev


def _plain_tensor(file: GGUFFile, info: TensorInfo, shape: torch.Size) -> torch.Tensor:
    """A zero-copy view of an unquantized tensor's values."""
    qt = get_quant_type(info.qtype)
    assert qt.torch_dtype is not None
    if info.nbytes == 0:
        return torch.empty(shape, dtype=qt.torch_dtype)
    return file.tensor_data(info).view(qt.torch_dtype).reshape(shape)


def _load_one(file: GGUFFile, info: TensorInfo, *, lazy: bool, dtype: torch.dtype | None,
              device: torch.device) -> torch.Tensor:
    shape = logical_shape(file, info)
    qt = get_quant_type(info.qtype)
    if qt.torch_dtype is not None:
        t = _plain_tensor(file, info, shape)
        want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        if lazy and want == t.dtype and device.type == "cpu":
            return t  # zero-copy view of the mapping
        out = t.to(device=device, dtype=want)
        # Eager tensors own their memory: they must not pin (or alias) the file's mapping.
        return out.clone() if out.data_ptr() == t.data_ptr() else out
    raw = file.tensor_data(info)
    if lazy:
        q = GGMLTensor(raw, info.qtype, shape, dtype or torch.float32)
        # (the raw view is on the CPU already: no ``.to`` round trip through dispatch for it)
        return q if device.type == "cpu" else q.to(device)
    return dequantize(raw.to(device), info.qtype, dtype=dtype or torch.float32).reshape(shape)


def load_state_dict(path: str | os.PathLike[str], *, lazy: bool = False, dtype: DTypeLike = None,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a GGUF file.

    Args:
        path: the .gguf file. It is mapped read-only-to-disk and never modified.
        lazy: ``False`` decodes every tensor to a plain tensor. ``True`` returns quantized tensors
            as :class:`GGMLTensor` (raw blocks, decoded on use) and unquantized ones as plain
            tensors; on CPU both are zero-copy views of the memory-mapped file, so a 10 GB file
            costs no 10 GB of RAM.
        dtype: ``None`` keeps F32/F16/BF16/F64 tensors in their stored dtype and decodes quantized
            ones to float32 (lazy: their compute dtype is float32). A dtype or name (``"auto"``,
            ``"float32"``, ``"float16"``, ``"bfloat16"``) converts every floating tensor (lazy: sets
            the compute dtype of quantized ones). Integer tensors are never converted.
        device: where the tensors go (lazy: raw blocks are moved, not decoded).

    Tensors stored with more than 4 dims by any of the three conventions in use (native n-dim,
    ``<name>.raw_shape``, ``comfy.gguf.orig_shape.<name>``) come back in their original shape.

    Raises:
        FileNotFoundError: no such file.
        GGUFError: the file is malformed (the message names the file, the tensor and the problem).
    """
    dev = torch.device(device)
    return read_tensors(GGUFFile(path), lazy=lazy, dtype=resolve_dtype(dtype, dev), device=dev)


def read_tensors(file: GGUFFile, *, lazy: bool, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of an open file (:func:`load_state_dict` on a :class:`GGUFFile`)."""
    dev = torch.device(device)
    return {name: _load_one(file, info, lazy=lazy, dtype=dtype, device=dev)
            for name, info in file.tensors.items()}


def file_architecture(file: GGUFFile) -> str | None:
    """The file's ``general.architecture`` when it is a string, else ``None``."""
    arch = file.metadata.get("general.architecture")
    return arch if isinstance(arch, str) else None


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off inside the block, as it was after it (nestable).

    Loading makes tens of thousands of objects that all stay alive, enough to set off full
    collections, whose cost grows with everything the process holds (~270 ms each in a process
    with diffusers imported and a few models loaded: ``benchmarks/load_pauses.py --keep``), for
    nothing to collect. :func:`ggufvideo.load_model` and :func:`ggufvideo.from_gguf` run under it.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
