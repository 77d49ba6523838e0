"""``from_gguf``: the right model object for a downloaded .gguf file, with no config and no network.

The file's family and layout are detected from its tensor names (:mod:`ggufvideo.models`), the
config is read off the tensors' shapes, the diffusers class is built with its parameters on the
meta device (buffers real: rotary tables) and the file's tensors are assigned, renamed into
diffusers' layout where the file uses another (exact: rows of raw blocks).

A file may carry the config it was made from as JSON under ``ggufvideo.config`` (our converter
writes it when the source has a ``config.json``); its values win over the inferred ones, which
matters for the few settings no shape tells (a Wan model whose heads are not 128 wide).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, _safe
from .loader import DTypeLike, file_architecture, paused_gc, read_tensors, resolve_dtype
from .model import assign_state_dict, empty_weights
from .models import Description, describe
from .ops import swap_quant_layers
from .reader import GGUFFile, is_gguf
from .shapes import logical_shape
from .sources import Source, open_source

__all__ = ["from_gguf", "describe_file", "CONFIG_KEY"]

#: Metadata key holding the source model's config as a JSON object.
CONFIG_KEY = "ggufvideo.config"


def _stored_config(file: GGUFFile) -> dict[str, Any]:
    raw = file.metadata.get(CONFIG_KEY)
    if raw is None:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"metadata {CONFIG_KEY!r} is not valid JSON ({exc})",
                             path=file.path) from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"metadata {CONFIG_KEY!r} must be a JSON object", path=file.path)
    return value


def _metadata_config(ckpt: _Checkpoint, desc: Description) -> dict[str, Any]:
    """Config values the family reads from the file's metadata (``<arch>.<key>``)."""
    fam = desc.detection.family
    arch = ckpt.architecture
    if not fam.metadata_config or not arch:
        return {}
    out = {}
    for suffix, key in fam.metadata_config.items():
        value = ckpt.metadata.get(f"{arch}.{suffix}")
        if isinstance(value, (int, float, str, bool)):
            out[key] = value
    return out


#: Single-file checkpoints besides GGUF: safetensors, and the releases' own torch pickles
#: (Wan's ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``; read with weights_only).
SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class _Checkpoint:
    """A model file opened by its header: a GGUF file, or a single-file safetensors checkpoint
    (what ComfyUI setups hold for VAEs and text encoders), read the same way from here on."""

    path: str
    shapes: dict[str, tuple[int, ...]]
    architecture: str | None
    metadata: Mapping[str, Any]
    # stored config (with its _class_name): ggufvideo.config metadata, or a config.json beside
    config: dict[str, Any]
    # (which names to read, a dtype for floating tensors or None) -> the tensors
    tensors: Callable[[Callable[[str], bool], torch.dtype | None], dict[str, torch.Tensor]]
    gguf: GGUFFile | None = None


def _read_source(src: Source, keep: Callable[[str], bool], dtype: torch.dtype | None
                 ) -> dict[str, torch.Tensor]:
    """A safetensors checkpoint's tensors that ``keep`` names, one at a time, each cast to
    ``dtype`` as it is read: a float32 copy of a whole fp8/bf16 encoder never exists at once, and
    an all-in-one file's other parts are never read."""
    out = {}
    for t in src.tensors:
        if keep(t.name):
            v = t.load()
            out[t.name] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def _open(path: str | os.PathLike[str] | GGUFFile | Source) -> _Checkpoint:
    if isinstance(path, Source):  # a checkpoint already opened by its header (inspect's)
        return _source_checkpoint(path)
    if isinstance(path, GGUFFile) or (not os.path.isdir(path) and is_gguf(path)):
        file = path if isinstance(path, GGUFFile) else GGUFFile(path)
        shapes = {name: tuple(logical_shape(file, info)) for name, info in file.tensors.items()}
        return _Checkpoint(file.path, shapes, file_architecture(file), file.metadata,
                           _stored_config(file),
                           lambda keep, _dtype: {k: v for k, v in read_tensors(file, lazy=True)
                                                 .items() if keep(k)}, file)
    p = os.fspath(path)
    if not (os.path.isdir(p) or p.lower().endswith(SINGLE_FILE_SUFFIXES)):
        raise ModelLoadError("expected a .gguf file, a single .safetensors (or .pt/.pth) "
                             "checkpoint or a folder of safetensors shards", path=p)
    return _source_checkpoint(open_source(p))


def _source_checkpoint(src: Source) -> _Checkpoint:
    from .sources.layout import source_config

    return _Checkpoint(src.path, {t.name: tuple(t.shape) for t in src.tensors}, None, {},
                       source_config(src.path) or {},
                       lambda keep, dtype: _read_source(src, keep, dtype))


def library_class(name: str) -> bool:
    """``name`` is a class of diffusers or transformers (whichever is installed): a config
    naming one is a library's, not a release's own (Wan-AI's ``WanModel``)."""
    for library in ("diffusers", "transformers"):
        try:
            if hasattr(importlib.import_module(library), name):
                return True
        except ImportError:
            continue
    return False


def checkpoint_shapes(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[int, ...]],
                                                             str | None]:
    """(tensor name -> shape, ``general.architecture``) of a GGUF file or a single safetensors
    checkpoint, from its header alone."""
    ckpt = _open(path)
    return ckpt.shapes, ckpt.architecture


def _describe(ckpt: _Checkpoint) -> Description:
    desc = describe(ckpt.shapes, ckpt.architecture, source=ckpt.path)
    # A stored config counts only for the class it was written for: the config.json of a
    # release's own folder (Wan-AI's "WanModel": qk_norm true, dim, ...) is not diffusers'.
    own = ckpt.config.get("_class_name") in (None, desc.class_name)
    stored = {**_metadata_config(ckpt, desc),
              **({k: v for k, v in ckpt.config.items() if not k.startswith("_")} if own else {})}
    if stored:
        desc = Description(desc.detection, {**desc.config, **stored}, desc.class_name,
                           desc.variant)
    return desc


def describe_file(path: str | os.PathLike[str] | GGUFFile | Source) -> Description:
    """Family, layout, variant and config of a model file (names, shapes, metadata; no data): a
    GGUF file, a single ``.safetensors``/``.pt``/``.pth`` checkpoint, a folder of shards, or a
    checkpoint already opened by :func:`ggufvideo.convert.open_source`.

    Raises:
        FileNotFoundError: no such file.
        UnknownModelError: no known family matches (the message lists them).
        ModelLoadError: a tensor the config needs is missing or malformed (named), or a file of
            another kind.
    """
    return _describe(_open(path))


#: library -> the extra that installs it (and what to do without it)
_EXTRAS = {"diffusers": "'ggufvideo[demo]' (or load the weights into your own module with "
                        "ggufvideo.load_model)",
           "transformers": "'ggufvideo[text-encoders]'"}


def _model_class(name: str, library: str, path: str) -> type[nn.Module]:
    """The class ``name`` of ``library`` (``"diffusers"`` or ``"transformers"``), imported only
    now: neither is a dependency of the core package."""
    if library not in _EXTRAS:
        raise ModelLoadError(f"unknown model library {library!r} for class {name}", path=path)
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise ImportError(f"{_safe(path, 300)} holds a {name}; building it needs {library}: "
                          f"pip install {_EXTRAS[library]}") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise ImportError(f"{_safe(path, 300)} holds a {name}, which {library} "
                          f"{module.__version__} does not have; upgrade {library}")
    return cls  # type: ignore[no-any-return]


def _build(cls: type[nn.Module], library: str, config: dict[str, Any]) -> nn.Module:
    """``cls`` built from ``config`` with its parameters on meta (buffers real)."""
    with empty_weights():
        if library == "transformers":
            return cls(cls.config_class(**config))  # type: ignore[attr-defined,call-arg]
        return cls.from_config(config)  # type: ignore[attr-defined,no-any-return]


def from_gguf(path: str | os.PathLike[str], *, lazy: bool = True, dtype: DTypeLike = None,
              device: torch.device | str | None = None,
              config: dict[str, Any] | None = None) -> nn.Module:
    """Build and load the model a GGUF file holds.

    Args:
        path: the .gguf file -- a Wan, HunyuanVideo, LTX-Video, CogVideoX or Mochi transformer,
            a Wan, HunyuanVideo or LTX-Video VAE (original or diffusers tensor names), a T5/UMT5
            (llama.cpp's, transformers' or Wan's names), Llama text encoder or CLIP vision
            encoder -- or a single ``.safetensors``/``.pt``/``.pth`` checkpoint of one, or a
            folder of safetensors shards (weights as stored, not quantized; fp8-scaled weights
            multiplied back; a ``config.json`` of the built class beside it counts as the stored
            config), such as the files ComfyUI setups hold and the releases' own.
        lazy: keep quantized weights quantized (see :func:`ggufvideo.load_model`).
        dtype: compute dtype / dtype of floating tensors (``"bfloat16"``, ``"auto"``, ...).
        device: where the weights go (``None``: CPU).
        config: values that override the inferred config (e.g. ``{"num_attention_heads": 12}``).

    Returns:
        The diffusers model (``WanTransformer3DModel``, ``AutoencoderKLWan``, ...) or, for a text
        encoder, the transformers model (``UMT5EncoderModel``, ``T5EncoderModel``), in eval mode.

    Raises:
        FileNotFoundError: no such file.
        UnknownModelError: the file's architecture and names match no known family.
        ModelLoadError: a tensor is missing, misnamed or of the wrong shape (named).
        ImportError: diffusers (transformers, for a text encoder) is not installed or lacks the
            class.
    """
    with paused_gc():  # (see there: full collections would find nothing to free here)
        ckpt = _open(path)
        desc = _describe(ckpt)
        cfg = {**desc.config, **(config or {})}
        family = desc.detection.family
        cls = _model_class(desc.class_name, family.library, ckpt.path)
        model = _build(cls, family.library, cfg)
        if lazy:
            swap_quant_layers(model)
        prefix = desc.detection.prefix

        def keep(key: str) -> bool:  # the detected part, without what the family never uses
            return key.startswith(prefix) and not family.is_unused(key[len(prefix):])

        sd = ckpt.tensors(keep, resolve_dtype(dtype, device if device is not None else "cpu"))
        assign_state_dict(model, sd, strict=True, lazy=lazy, dtype=dtype, device=device,
                          path=ckpt.path, architecture=ckpt.architecture,
                          metadata=ckpt.metadata if ckpt.gguf is not None else None,
                          source=ckpt.gguf)
    return model.eval()
