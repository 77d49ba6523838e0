"""The model-family layer: which model a file holds, in which naming, and with which config.

Each module of this package that defines a module-level ``FAMILY`` (a :class:`Family`) is a
family; adding one is adding a file. :func:`detect` tells a file's family and layout from its
tensor names (and its ``general.architecture``), :meth:`Family.convert` renames tensors between
layouts, and :func:`describe` reads the config off the tensors' shapes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import UnknownModelError
from .base import (
    CANONICAL,
    Family,
    Rule,
    ShapeOps,
    Shapes,
    ValueOps,
    convert_layout,
    inverse_permutation,
    rename,
)

__all__ = [
    "CANONICAL",
    "CONTAINER_PREFIXES",
    "Detection",
    "Description",
    "Family",
    "Rule",
    "Shapes",
    "ShapeOps",
    "ValueOps",
    "convert_layout",
    "describe",
    "detect",
    "families",
    "get_family",
    "inverse_permutation",
    "rename",
    "strip_prefix",
]

V = TypeVar("V")

#: Prefixes checkpoints put before a single model's keys (ComfyUI files:
#: ``model.diffusion_model.``).
CONTAINER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.",
                      "vae.", "first_stage_model.", "net.", "module.")

_NON_FAMILY_MODULES = {"base", "tensors", "matching", "gguf_names"}
_REGISTRY: dict[str, Family[Any]] | None = None


def families() -> dict[str, Family[Any]]:
    """Every known family by name (the modules of this package that define ``FAMILY``)."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, Family[Any]] = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            if info.name.startswith("_") or info.name in _NON_FAMILY_MODULES:
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            fam = getattr(module, "FAMILY", None)
            if isinstance(fam, Family):
                found[fam.name] = fam
        _REGISTRY = found
    return _REGISTRY


def get_family(name: str) -> Family[Any]:
    """A family by name; an :class:`UnknownModelError` listing the known ones otherwise."""
    fams = families()
    if name not in fams:
        raise UnknownModelError(f"unknown model family {name!r}; known: {known_families()}")
    return fams[name]


def known_families() -> str:
    """The known families, for error messages: ``"wan (Wan 2.1/2.2 transformer), ..."``."""
    return ", ".join(f"{f.name} ({f.title}; architecture "
                     f"{'/'.join(f.architectures) or '-'})" for f in families().values())


def strip_prefix(values: Mapping[str, V], prefix: str) -> dict[str, V]:
    """Remove ``prefix`` from every key that starts with it; other keys are kept as they are."""
    n = len(prefix)
    return {(k[n:] if prefix and k.startswith(prefix) else k): v for k, v in values.items()}


@dataclass(frozen=True)
class Detection:
    """A file's (or model's) family and layout.

    Attributes:
        family: the family.
        layout: the layout its names follow.
        prefix: the container prefix its keys carry (``"model.diffusion_model."``) or ``""``.
        architecture: the file's ``general.architecture`` (``None`` when absent).
    """

    family: Family[Any]
    layout: str
    prefix: str
    architecture: str | None = None

    def split(self, values: Mapping[str, V]) -> tuple[dict[str, V], dict[str, V]]:
        """The entries under :attr:`prefix` keyed by the family's own names (prefix removed),
        and the entries outside it as they are."""
        n = len(self.prefix)
        inner = {k[n:]: v for k, v in values.items() if k.startswith(self.prefix)}
        return inner, {k: v for k, v in values.items() if not k.startswith(self.prefix)}


def _candidates(keys: Iterable[str]) -> list[tuple[str, set[str]]]:
    """(prefix, the keys under it without it): none, the known container prefixes, and any other
    prefix in front of a family's signature key that holds nearly the whole file (a part saved
    from ComfyUI under ``text_encoders.t5xxl.transformer.`` and the like). A prefix holding only
    part of the file (one backbone of a twin model such as Ovi's) is not a container."""
    keys = list(keys)
    out = [("", set(keys))]
    for prefix in CONTAINER_PREFIXES:
        inner = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if inner:
            out.append((prefix, inner))
    firsts = {alt[0] for fam in families().values() for alts in fam.signatures.values()
              for alt in alts}
    seen = set(CONTAINER_PREFIXES)
    for k in keys:
        for sig in firsts:
            if k.endswith(sig) and len(k) > len(sig) and k[-len(sig) - 1] == ".":
                prefix = k[:-len(sig)]
                if prefix in seen:
                    continue
                seen.add(prefix)
                inner = {k[len(prefix):] for k in keys if k.startswith(prefix)}
                if len(inner) >= 0.9 * len(keys):
                    out.append((prefix, inner))
    return out


def detect(keys: Iterable[str], architecture: str | None = None) -> Detection | None:
    """The family and layout of a set of tensor names, or ``None`` when no family matches.

    A layout matches when its signature keys are all present (directly or under one container
    prefix). Among several matches, a family whose ``architectures`` hold ``architecture`` wins,
    then the prefix that covers the most keys.
    """
    best: tuple[tuple[int, int], Detection] | None = None
    for prefix, inner in _candidates(keys):
        for fam in families().values():
            layout = fam.layout_of(inner)
            if layout is None:
                continue
            score = (int(architecture is not None and architecture in fam.architectures),
                     len(inner))
            if best is None or score > best[0]:
                best = (score, Detection(fam, layout, prefix, architecture))
    return best[1] if best else None


@dataclass(frozen=True)
class Description:
    """What a file holds, read off its names and shapes.

    Attributes:
        detection: family, layout, prefix.
        config: the diffusers config (constructor arguments) inferred from the shapes.
        class_name: the diffusers class the config builds.
        variant: a human name for the variant (``"T2V 14B"``).
    """

    detection: Detection
    config: dict[str, Any]
    class_name: str
    variant: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``ggufvideo inspect --json``)."""
        d = self.detection
        return {"family": d.family.name, "title": d.family.title, "kind": d.family.kind,
                "layout": d.layout, "prefix": d.prefix, "variant": self.variant,
                "class": self.class_name, "config": self.config}


def _llama_cpp_architectures() -> str:
    return ", ".join(sorted(a for f in families().values() if "llama.cpp" in f.signatures
                            for a in f.architectures))


def describe(shapes: Mapping[str, tuple[int, ...]], architecture: str | None = None, *,
             source: str | None = None) -> Description:
    """Detect the family of a file's tensors and infer its config from their shapes.

    Args:
        shapes: tensor name -> logical shape (PyTorch order), as in the file.
        architecture: the file's ``general.architecture``.
        source: the file, named in errors.

    Raises:
        UnknownModelError: no family matches (the message lists the known families).
        ModelLoadError: the family matches but a tensor the config needs is missing or malformed.
    """
    det = detect(shapes, architecture)
    if det is None:
        arch = f"architecture {architecture!r}" if architecture else "no general.architecture"
        raise UnknownModelError(f"no known model family matches this file ({arch}, "
                                f"{len(shapes)} tensors); known families: {known_families()}",
                                path=source)
    inner, _ = det.split(shapes)
    fam = det.family
    if det.layout == "llama.cpp" and architecture and architecture not in fam.architectures:
        # llama.cpp gives many architectures the same tensor names, not the same model
        raise UnknownModelError(
            f"architecture {architecture!r} (llama.cpp's tensor names) is not a model ggufvideo "
            f"builds; its llama.cpp-named text encoders are {_llama_cpp_architectures()}",
            path=source)
    found = fam.unsupported_variant(inner)
    if found is not None:
        raise UnknownModelError(
            f"{found[0]}: the file has {det.prefix + found[1]!r}, a module of that variant of "
            f"the {fam.title}, which ggufvideo does not build", path=source)
    canonical = det.family.convert(inner, det.layout, CANONICAL, ShapeOps())
    view = Shapes(canonical, source)
    config = det.family.infer_config(view)
    return Description(det, config, det.family.class_name(config),
                       det.family.variant(config, view))
