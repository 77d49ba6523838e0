"""Fitting a file's tensor names to a model's: prefix stripping and layout mapping.

``load_model`` asks: which renaming of the file's keys matches the most of the model's keys? The
candidates are the file's keys as they are (after the best container prefix), and -- when the file
is a known family -- the file renamed into each other layout of that family. Candidates are scored
on names and shapes alone; only the winner's tensors are converted (row splits/joins of raw
blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import CONTAINER_PREFIXES, Detection, Family, ShapeOps, detect, strip_prefix
from .tensors import TensorOps

__all__ = ["LayoutMatch", "match_layout", "best_prefix", "describe_keys"]


def best_prefix(file_keys: Iterable[str], model_keys: set[str]) -> str:
    """The prefix whose removal matches the most file keys to model keys ("" if none helps)."""
    file_keys = list(file_keys)
    direct = sum(k in model_keys for k in file_keys)
    counts: dict[str, int] = {}
    for key in file_keys:
        if key in model_keys:
            continue
        start = 0
        while (dot := key.find(".", start)) != -1:
            if key[dot + 1:] in model_keys:
                counts[key[:dot + 1]] = counts.get(key[:dot + 1], 0) + 1
                break  # the shortest prefix that matches: the model's own key is the longest
            start = dot + 1
    if not counts:
        return ""
    # most matches wins; among equals, a prefix real files use, then the shortest
    best = max(counts, key=lambda p: (counts[p], p in CONTAINER_PREFIXES, -len(p)))
    return best if counts[best] > direct else ""


@dataclass(frozen=True)
class LayoutMatch:
    """How a file's keys were fitted to a model.

    Attributes:
        prefix: the container prefix removed from the file's keys.
        family: the file's family, when known.
        source: the layout the file's names follow (``None``: unknown family).
        target: the layout they were renamed to (``== source`` when no renaming was needed).
        matched: how many of the model's keys the renamed file holds.
    """

    prefix: str
    family: Family[Any] | None
    source: str | None
    target: str | None
    matched: int

    @property
    def renamed(self) -> bool:
        return self.family is not None and self.source != self.target

    def __str__(self) -> str:
        if self.family is None:
            return "tensor names used as they are" + (f" (prefix {self.prefix!r} removed)"
                                                      if self.prefix else "")
        what = (f"{self.family.title}: {self.source} layout mapped to {self.target} layout"
                if self.renamed else f"{self.family.title}, {self.source} layout")
        return what + (f" (prefix {self.prefix!r} removed)" if self.prefix else "")


def _score(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]],
           model: Mapping[str, tuple[int, ...]]) -> int:
    return sum(1 for k in keys if k in model and tuple(shapes[k]) == model[k])


def match_layout(state_dict: Mapping[str, torch.Tensor],
                 model_shapes: Mapping[str, tuple[int, ...]],
                 *, prefix: str | None = None, architecture: str | None = None,
                 context: Mapping[str, Any] | None = None
                 ) -> tuple[dict[str, torch.Tensor], LayoutMatch]:
    """Rename ``state_dict`` to fit ``model_shapes`` (model key -> shape) as well as possible.

    Args:
        state_dict: the file's tensors, as named in the file.
        model_shapes: the model's parameter and persistent-buffer shapes.
        prefix: strip exactly this prefix (``None``: the best one; ``""``: none).
        architecture: the file's ``general.architecture`` (helps detection).
        context: the file's metadata, for rules whose row order depends on it (llama.cpp's q/k
            rows need the head counts; :attr:`Rule.rows`).

    Returns:
        The renamed state dict and how it was fitted.
    """
    model_keys = set(model_shapes)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    det = detect(shapes, architecture)
    if prefix is None:
        prefix = best_prefix(shapes, model_keys)
    plain = strip_prefix(shapes, prefix)
    best = LayoutMatch(prefix, det.family if det else None, det.layout if det else None,
                       det.layout if det else None, _score(plain, plain, model_shapes))
    if det is not None:
        inner, _ = det.split(shapes)
        for layout in det.family.layouts:
            if layout == det.layout:
                continue
            try:
                renamed = det.family.convert(inner, det.layout, layout, ShapeOps())
            except ValueError:
                continue
            score = _score(renamed, renamed, model_shapes)
            if score > best.matched:
                best = LayoutMatch(det.prefix, det.family, det.layout, layout, score)
    if not best.renamed:
        return strip_prefix(state_dict, best.prefix), best
    assert best.family is not None and best.source is not None and best.target is not None
    assert det is not None  # a renaming is one of the detected family's layouts
    inner_sd, _ = det.split(state_dict)
    return best.family.convert(inner_sd, best.source, best.target, TensorOps(), context), best


def describe_keys(keys: Iterable[str], architecture: str | None = None) -> str:
    """"Wan 2.1/2.2 transformer, original layout" or "no known family", for error messages."""
    det: Detection | None = detect(list(keys), architecture)
    if det is None:
        return "no known model family"
    return f"{det.family.title}, {det.layout} layout" + (
        f" (prefix {det.prefix!r})" if det.prefix else "")
