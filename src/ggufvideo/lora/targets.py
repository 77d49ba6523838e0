"""Mapping a LoRA's target names onto a model's tensors, through the model-family layer.

A model's weights are known by name and shape (a module tree's state dict, or a GGUF file's
tensors). For the model's family (:func:`ggufvideo.models.detect`) each of its layouts gives a
*table*: the model's keys renamed into that layout (:meth:`Family.convert`), each name carrying
the row segments of the model's tensors it corresponds to (a fused QKV split into three parts, or
three parts joined into one, become row ranges). A LoRA's target ``T`` matches a table when
``T.weight`` (or ``T.bias``) is one of its names -- after removing a container prefix
(``diffusion_model.``, ``transformer.``, ``lora_unet_``) and, for kohya's underscore names, by
looking the name up among the table's names with dots written as underscores (unambiguous by
construction: the candidates are the model's own names). The table that explains the most targets
wins; an original-named LoRA thereby lands on a diffusers model and vice versa.

Output: per model tensor, the pieces of LoRA rows that land on it (:class:`Piece`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import LoraError, _safe
from ..models import CONTAINER_PREFIXES, detect
from .formats import KOHYA_PREFIXES, TEXT_ENCODER_PREFIXES, LoraEntry, LoraFile, is_bias_key

__all__ = ["Piece", "Resolution", "resolve"]

#: Prefixes LoRA files put before a layer's name, beyond the model containers.
LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.",
                 "transformer.", "unet.", "pipe.dit.", "dit.", *CONTAINER_PREFIXES,
                 # a text-encoder part names the encoder's layers under these (it matches a
                 # text encoder's own names; on a transformer it is left out, see resolve)
                 *(p for p in TEXT_ENCODER_PREFIXES if p.endswith(".")))

#: A row segment: rows ``start:stop`` of model tensor ``key``.
Segment = tuple[str, int, int]


class SegmentOps:
    """:class:`~ggufvideo.models.ValueOps` over lists of row segments of the model's tensors."""

    def rows(self, v: list[Segment]) -> int:
        return sum(stop - start for _, start, stop in v)

    def split(self, v: list[Segment], sizes: Sequence[int]) -> list[list[Segment]]:
        out: list[list[Segment]] = []
        segs = list(v)
        for size in sizes:
            part: list[Segment] = []
            while size > 0:
                key, start, stop = segs[0]
                take = min(size, stop - start)
                part.append((key, start, start + take))
                size -= take
                if start + take == stop:
                    segs.pop(0)
                else:
                    segs[0] = (key, start + take, stop)
            out.append(part)
        return out

    def cat(self, vs: Sequence[list[Segment]]) -> list[Segment]:
        return [s for v in vs for s in v]

    def swap_halves(self, v: list[Segment]) -> list[Segment]:
        n = self.rows(v)
        a, b = self.split(v, [n // 2, n - n // 2])
        return b + a

    def permute_rows(self, v: list[Segment], order: Callable[[], Sequence[int]]) -> list[Segment]:
        rows = [(key, r) for key, start, stop in v for r in range(start, stop)]
        out: list[Segment] = []
        for i in order():
            key, r = rows[i]
            if out and out[-1][0] == key and out[-1][2] == r:
                out[-1] = (key, out[-1][1], r + 1)  # runs of consecutive rows stay one segment
            else:
                out.append((key, r, r + 1))
        return out


@dataclass(frozen=True)
class Piece:
    """Rows ``lora_rows`` of an entry's up/diff land on rows ``rows`` of model tensor ``key``."""

    entry: LoraEntry
    key: str
    rows: tuple[int, int]
    lora_rows: tuple[int, int]
    total_rows: int
    name_rows: int


@dataclass
class Resolution:
    """Where a LoRA's entries land on a model.

    Attributes:
        weights: model weight key -> pieces of low-rank pairs and weight diffs.
        biases: model bias key -> pieces of bias diffs.
        unmatched: file keys of entries that matched no model tensor, then keys of no known
            LoRA scheme.
        layout: the table that won (``"as is"`` or ``"<family>:<layout>"``).
        unknown: the keys of no known LoRA scheme (also in :attr:`unmatched`).
        skipped: keys of the LoRA's text-encoder part, which a transformer leaves alone.
    """

    weights: dict[str, list[Piece]]
    biases: dict[str, list[Piece]]
    unmatched: list[str]
    layout: str
    unknown: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def check_matched(self, source: str, what: str, hint: str = "") -> None:
        """Raise a :class:`~ggufvideo.errors.LoraError` naming ``source`` and the first unmatched
        key (five in the message) if any LoRA key matched no tensor of ``what``."""
        unknown = set(self.unknown)
        matched_none = [k for k in self.unmatched if k not in unknown]
        if matched_none:
            shown = ", ".join(_safe(k) for k in matched_none[:5])
            raise LoraError(f"{len(matched_none)} LoRA key(s) match no tensor of {what} (e.g. "
                            f"{shown}){hint}", path=source, tensor=matched_none[0])
        if self.skipped and not self.weights and not self.biases:
            raise LoraError(f"every key of this LoRA is for a text encoder (e.g. "
                            f"{_safe(self.skipped[0])}): nothing in it is for {what}{hint}",
                            path=source, tensor=self.skipped[0])
        if self.unknown:
            shown = ", ".join(_safe(k) for k in self.unknown[:5])
            raise LoraError(f"{len(self.unknown)} key(s) of no known LoRA scheme (e.g. {shown}; "
                            "expected suffixes such as .lora_down.weight, .lora_A.weight, .alpha, "
                            f".diff){hint}", path=source, tensor=self.unknown[0])

    def warn_skipped(self, source: str) -> None:
        """Warn (once per call) that the LoRA's text-encoder keys were left alone."""
        if self.skipped:
            warnings.warn(f"{_safe(source)}: {len(self.skipped)} key(s) of the LoRA's text-encoder "
                          f"part (e.g. {_safe(self.skipped[0])}) are not for the transformer and "
                          "were left out", stacklevel=3)


def _tables(shapes: Mapping[str, tuple[int, ...]], architecture: str | None
            ) -> list[tuple[str, dict[str, list[Segment]]]]:
    """(label, name -> segments) per layout the model's names can be written in."""
    def seg(k: str) -> list[Segment]:
        s = shapes[k]
        return [(k, 0, int(s[0]) if len(s) else 1)]

    tables = [("as is", {k: seg(k) for k in shapes})]
    det = detect(shapes, architecture)
    if det is None:
        return tables
    n = len(det.prefix)
    inner = {k[n:]: seg(k) for k in shapes if k.startswith(det.prefix)}
    if det.prefix:
        tables.append((f"{det.family.name}:{det.layout}", inner))
    for layout in det.family.layouts:
        if layout == det.layout:
            continue
        try:
            tables.append((f"{det.family.name}:{layout}",
                           det.family.convert(inner, det.layout, layout, SegmentOps())))
        except ValueError:
            continue
    return tables


def _candidates(target: str) -> list[str]:
    """``target`` and what is left of it after removing known prefixes, one after another (a
    peft wrapper around a container: ``base_model.model.transformer.``), nearest first."""
    out = [target]
    for name in out:  # grows while it is walked: each new name is stripped in its turn
        for p in (*KOHYA_PREFIXES, *LORA_PREFIXES):
            if name.startswith(p) and len(name) > len(p) and name[len(p):] not in out:
                out.append(name[len(p):])
    return out


def _lookup(entry: LoraEntry, table: dict[str, list[Segment]],
            underscored: dict[str, str | None], suffix: str) -> str | None:
    for c in _candidates(entry.target):
        if c + suffix in table:
            return c + suffix
    if entry.kohya:
        for c in _candidates(entry.target):
            name = underscored.get(c + suffix.replace(".", "_"))
            if name is not None:
                return name
    return None


def _underscore_index(table: dict[str, list[Segment]]) -> dict[str, str | None]:
    idx: dict[str, str | None] = {}
    for k in table:
        u = k.replace(".", "_")
        idx[u] = None if u in idx and idx[u] != k else k  # None: ambiguous, never matched
    return idx


def resolve(lora: LoraFile, shapes: Mapping[str, tuple[int, ...]], *,
            architecture: str | None = None) -> Resolution:
    """Map ``lora``'s entries onto the model tensors ``shapes`` (key -> shape)."""
    best: tuple[int, str, dict[str, tuple[str | None, str | None]]] | None = None
    for label, table in _tables(shapes, architecture):
        idx = _underscore_index(table)
        found = {}
        for e in lora:
            w = _lookup(e, table, idx, ".weight") if e.has_weight else None
            if w is None and e.kind == "diff" and e.diff is not None:
                # a full delta of a parameter that is not a layer's weight (Wan's modulation,
                # LTX's scale_shift_table, FLF2V's emb_pos): named as it is
                w = _lookup(e, table, idx, "")
            b = _lookup(e, table, idx, ".bias") if e.diff_b is not None else None
            found[e.target] = (w, b)
        score = sum((w is not None) + (b is not None) for w, b in found.values())
        if best is None or score > best[0]:
            best = (score, label, found)
            best_table = table
    assert best is not None
    _, label, found = best
    weights: dict[str, list[Piece]] = {}
    biases: dict[str, list[Piece]] = {}
    unmatched: list[str] = []
    skipped: list[str] = []
    for e in lora:
        w, b = found[e.target]
        if w is None and b is None and text_encoder_part(e.target):
            skipped.extend(e.keys)
            continue
        if e.has_weight and w is None:
            unmatched.extend(k for k in e.keys if not is_bias_key(k))
        if e.diff_b is not None and b is None:
            unmatched.extend(k for k in e.keys if is_bias_key(k))
        for name, out in ((w, weights), (b, biases)):
            if name is None:
                continue
            at = 0
            segs = best_table[name]
            name_rows = sum(stop - start for _, start, stop in segs)
            for key, start, stop in segs:
                out.setdefault(key, []).append(Piece(e, key, (start, stop), (at, at + stop - start),
                                                     int(shapes[key][0]) if shapes[key] else 1,
                                                     name_rows))
                at += stop - start
    return Resolution(weights, biases, unmatched + list(lora.unknown), label, list(lora.unknown),
                      skipped)


def text_encoder_part(target: str) -> bool:
    """The target names a text encoder's layer (under any wrapper prefix)."""
    return any(c.startswith(TEXT_ENCODER_PREFIXES) for c in _candidates(target))
