"""What a LoRA file holds, without a model: naming, adapter kinds, ranks, scales, layer widths
(``ggufvideo inspect LORA``)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .formats import KOHYA_PREFIXES, LoraFile, read_lora
from .targets import text_encoder_part

__all__ = ["describe_lora", "format_lora"]

#: Naming schemes, by the prefix their targets start with (the first that matches).
_NAMINGS = (("base_model.model.", "peft"), ("diffusion_model.", "original (ComfyUI)"),
            ("model.diffusion_model.", "original (ComfyUI)"), ("transformer.", "diffusers"),
            ("pipe.dit.", "DiffSynth"), ("lycoris_", "LyCORIS (SimpleTuner)"))


def _naming(target: str) -> str:
    for prefix, name in _NAMINGS:
        if target.startswith(prefix):
            return name
    if target.startswith(KOHYA_PREFIXES) or "." not in target:
        return "kohya / musubi-tuner"
    return "as the model names its layers"


def describe_lora(lora: str | os.PathLike[str] | LoraFile) -> dict[str, Any]:
    """A JSON-serialisable description of a LoRA: ``source``, ``layers``, ``naming`` (scheme ->
    layers), ``kinds`` (pair / LoHa / LoKr / diff -> layers), ``dora`` and ``bias_deltas``
    (layers with them), ``ranks`` and ``scales`` (value -> layers; the scale is alpha / rank, or
    a peft config's), ``widths`` (input width -> layers: the model's hidden size shows here, e.g.
    5120 for Wan 14B, 1536 for 1.3B), ``first_targets``, ``text_encoder_layers`` (its
    text-encoder part) and ``unknown_keys`` (of no known scheme).

    Raises:
        LoraError, FileNotFoundError: as :func:`~ggufvideo.lora.read_lora`.
    """
    lf = read_lora(lora)
    entries = list(lf)
    kinds = Counter(("LoRA pair" if e.kind == "lora" else e.kind) for e in entries
                    if e.has_weight)
    widths: Counter[int] = Counter()
    for e in entries:
        if e.down is not None:
            widths[int(e.down[0].numel())] += 1
        elif e.diff is not None and e.diff.dim() >= 2:
            widths[int(e.diff[0].numel())] += 1
    return {
        "source": lf.source,
        "layers": len(entries),
        "naming": dict(Counter(_naming(e.target) for e in entries).most_common()),
        "kinds": dict(kinds.most_common()),
        "dora": sum(e.magnitude is not None for e in entries),
        "bias_deltas": sum(e.diff_b is not None for e in entries),
        "ranks": {str(r): n for r, n in sorted(Counter(e.rank for e in entries
                                                          if e.low_rank).items())},
        "scales": {f"{s:g}": n for s, n in sorted(Counter(round(e.scale, 6) for e in entries
                                                          if e.low_rank).items())},
        "widths": {str(w): n for w, n in widths.most_common()},
        "first_targets": [e.target for e in entries[:3]],
        "text_encoder_layers": sum(text_encoder_part(e.target) for e in entries),
        "unknown_keys": list(lf.unknown),
    }


def format_lora(info: dict[str, Any]) -> str:
    """The description as text, one fact a line."""
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} ({v})" for k, v in d.items()) or "-"

    lines = [f"LoRA {info['source']}: {info['layers']} layers",
             f"  naming:       {counts(info['naming'])}",
             f"  adapters:     {counts(info['kinds'])}",
             f"  DoRA:         {info['dora']} layers",
             f"  bias deltas:  {info['bias_deltas']} layers",
             f"  ranks:        {counts(info['ranks'])}",
             f"  scales:       {counts(info['scales'])}",
             f"  input widths: {counts(info['widths'])}",
             f"  e.g.          {', '.join(info['first_targets'])}"]
    if info["text_encoder_layers"]:
        lines.append(f"  text encoder: {info['text_encoder_layers']} layers (left out when it is "
                     "put on a transformer)")
    if info["unknown_keys"]:
        shown = ", ".join(info["unknown_keys"][:3])
        lines.append(f"  unknown keys: {len(info['unknown_keys'])} of no known scheme "
                     f"(e.g. {shown})")
    return "\n".join(lines)
