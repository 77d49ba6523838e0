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
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError, _safe
from .loader import DTypeLike, file_architecture, read_tensors
from .model import assign_state_dict, empty_weights
from .models import Description, describe
from .ops import swap_quant_layers
from .reader import GGUFFile
from .shapes import logical_shape

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
    return {k: v for k, v in value.items() if not k.startswith("_")}


def _metadata_config(file: GGUFFile, desc: Description) -> dict[str, Any]:
    """Config values the family reads from the file's metadata (``<arch>.<key>``)."""
    fam = desc.detection.family
    arch = file_architecture(file)
    if not fam.metadata_config or not arch:
        return {}
    out = {}
    for suffix, key in fam.metadata_config.items():
        value = file.metadata.get(f"{arch}.{suffix}")
        if isinstance(value, (int, float, str, bool)):
            out[key] = value
    return out


def describe_file(path: str | os.PathLike[str] | GGUFFile) -> Description:
    """Family, layout, variant and config of a GGUF file (names and shapes, metadata; no data).

    Raises:
        FileNotFoundError: no such file.
        UnknownModelError: no known family matches (the message lists them).
        ModelLoadError: a tensor the config needs is missing or malformed (named).
    """
    file = path if isinstance(path, GGUFFile) else GGUFFile(path)
    shapes = {name: tuple(logical_shape(file, info)) for name, info in file.tensors.items()}
    desc = describe(shapes, file_architecture(file), source=file.path)
    stored = {**_metadata_config(file, desc), **_stored_config(file)}
    if stored:
        desc = Description(desc.detection, {**desc.config, **stored}, desc.class_name,
                           desc.variant)
    return desc


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
        path: the .gguf file (a Wan, HunyuanVideo, LTX-Video, CogVideoX or Mochi transformer, a
            Wan, HunyuanVideo or LTX-Video VAE, original or diffusers tensor names; or a T5/UMT5
            text encoder, llama.cpp's or transformers' names).
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
    file = GGUFFile(path)
    desc = describe_file(file)
    cfg = {**desc.config, **(config or {})}
    family = desc.detection.family
    cls = _model_class(desc.class_name, family.library, file.path)
    model = _build(cls, family.library, cfg)
    if lazy:
        swap_quant_layers(model)
    sd = read_tensors(file, lazy=True)
    if family.unused:
        n = len(desc.detection.prefix)
        sd = {k: v for k, v in sd.items() if not family.is_unused(k[n:])}
    assign_state_dict(model, sd, strict=True, lazy=lazy, dtype=dtype, device=device,
                      path=file.path, architecture=file_architecture(file),
                      metadata=file.metadata, source=file)
    return model.eval()
