"""What a conversion wrote: :class:`WriteSummary` (sizes, per-tensor decisions, fallbacks, notes)
and its human form, the summary ``ggufvideo convert`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import _safe
from .policy import TensorDecision
from .serialize import MAX_GGML_NAME

__all__ = ["WriteSummary", "format_bytes"]


@dataclass
class WriteSummary:
    """What a conversion wrote.

    Attributes:
        path: the file written.
        architecture: ``general.architecture``.
        bytes_in: bytes of the source tensors.
        bytes_out: size of the file.
        decisions: tensor name -> the policy's decision (``qtype`` is what was written).
        seconds: wall time.
        notes: anything worth telling (skipped entries, fallbacks to full-model loads).
        imatrix: the importance-matrix file used, or ``None``.
        imatrix_used: the tensors quantized with importance weights from it.
        imatrix_entries: how many entries the matrix has.
        tied: name -> the earlier name whose encoded bytes it reuses (tied weights).
        lora_changed: name -> the LoRA files baked into it (``convert --lora``).
    """

    path: str
    architecture: str
    bytes_in: int
    bytes_out: int
    decisions: dict[str, TensorDecision] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    imatrix: str | None = None
    imatrix_used: list[str] = field(default_factory=list)
    imatrix_entries: int = 0
    tied: dict[str, str] = field(default_factory=dict)
    lora_changed: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Number of tensors written per ggml type name."""
        out: dict[str, int] = {}
        for d in self.decisions.values():
            out[d.qtype.name] = out.get(d.qtype.name, 0) + 1
        return out

    def fallbacks(self) -> dict[str, TensorDecision]:
        """Tensors whose requested type did not fit their rows."""
        return {n: d for n, d in self.decisions.items() if d.fallback}

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({_safe(self.architecture, 100)}, {len(self.decisions)} "
                 f"tensors) in "
                 f"{self.seconds:.1f} s",
                 f"  size: {format_bytes(self.bytes_in)} -> {format_bytes(self.bytes_out)}"
                 + (f" ({self.bytes_out / self.bytes_in:.1%})" if self.bytes_in else "")]
        lines.append("  tensors per type: " + ", ".join(
            f"{k} {v}" for k, v in sorted(self.counts().items(), key=lambda kv: -kv[1])))
        fb = self.fallbacks()
        if fb:
            lines.append(f"  {len(fb)} tensor(s) fell back because their rows do not fit the "
                         "block size:")
            for n, d in list(fb.items())[:20]:
                lines.append(f"    {_safe(n)}: {d.fallback}")
            if len(fb) > 20:
                lines.append(f"    ... and {len(fb) - 20} more")
        if self.imatrix is not None:
            lines.append(f"  imatrix: {len(self.imatrix_used)} tensor(s) quantized with "
                         f"importance weights from {_safe(self.imatrix, 400)} "
                         f"({self.imatrix_entries} entries)")
        if self.lora_changed:
            srcs = sorted({f for fs in self.lora_changed.values() for f in fs})
            lines.append(f"  lora: {len(self.lora_changed)} tensor(s) changed by "
                         f"{', '.join(_safe(f, 200) for f in srcs)} (decoded, delta added in "
                         "float32, requantized); every other tensor as the policy says:")
            for n in list(self.lora_changed)[:20]:
                lines.append(f"    {_safe(n)}: {self.decisions[n].qtype.name}")
            if len(self.lora_changed) > 20:
                lines.append(f"    ... and {len(self.lora_changed) - 20} more (--verbose lists "
                             "them)")
        if self.tied:
            lines.append(f"  tied: {len(self.tied)} tensor(s) share another's data; encoded once, "
                         f"written under each name (e.g. {_safe(next(iter(self.tied)))} = "
                         f"{_safe(next(iter(self.tied.values())))})")
        long_names = [n for n in self.decisions if len(n.encode()) >= MAX_GGML_NAME]
        if long_names:
            lines.append(f"  note: {len(long_names)} tensor name(s) have {MAX_GGML_NAME}+ bytes; "
                         f"ggml's C loader (not ours, gguf-py's or ComfyUI-GGUF's) rejects them, "
                         f"e.g. {_safe(long_names[0])}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
