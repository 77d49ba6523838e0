"""The quantization policy: which ggml type each tensor of a model is written as.

A policy looks only at a tensor's name, shape and source dtype, never at its values, so every
decision is known before any data is read (the writer needs the whole header up front to stream).

Defaults, after what the peers keep and why:

* 1-D tensors (biases, norm weights, per-channel scales) and tiny tensors stay high precision:
  they cost nothing and quantizing them hurts most.
* Layers peers keep high precision stay high precision: Wan's ``modulation`` / ``scale_shift_table``
  (an ``nn.Parameter`` added to activations), text and time embeddings and their projections,
  and the output head. The patterns are matched anywhere in the name, so prefixed or twin-backbone
  checkpoints (``video_model.blocks.0.modulation``) are covered without per-architecture code.
* Presets ``Q4_K_M``/``Q5_K_M``/``Q3_K_M`` raise the layers quantization hurts most -- value and
  output projections of attention, the FFN down projection -- one or two steps up.
* ``overrides`` (regex -> type or ``"keep"``) win over everything else, first match wins.
* A tensor whose rows do not fit the chosen type's block size falls back along ggml's own chain
  (Q4_K -> Q5_0, Q6_K -> Q8_0, ...) and finally to high precision; the decision says so.
* Transformers' patch embeddings (Wan's 5-D ``patch_embedding``) stay high precision, as in the
  published files, so the peers' loaders read them. Other tensors with more than 4 dims (a VAE's
  Conv3d weights) are quantized when their element count fits the block size and stored flattened
  with their shape in the metadata (no peer quantizes them; our loader decodes them).

"High precision" means the source's own float type (F32, F16 or BF16: lossless; F32 for a BF16
tensor that is not 2-D, which diffusers' GGUF loader cannot read as BF16), F16 for float8 sources
(exact) and F32 for float64 ones, unless ``keep_type`` says otherwise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType as T

from .errors import UnsupportedTypeError
from .quants import get_quant_type, to_qtype

__all__ = [
    "QuantPolicy",
    "TensorDecision",
    "PRESETS",
    "DEFAULT_KEEP_PATTERNS",
    "SENSITIVE_PATTERNS",
    "KEEP",
    "FALLBACK_CHAIN",
    "source_qtype",
    "fits",
]

QTypeLike = T | str | int

#: Override value meaning "keep this tensor at high precision".
KEEP = "keep"

#: Tensors that stay high precision by default (regexes, ``re.search`` on the tensor name).
DEFAULT_KEEP_PATTERNS: tuple[str, ...] = (
    # Wan (original and diffusers), LTX-Video: added to activations, not matmul weights.
    r"(^|\.)modulation$",
    r"(^|\.)scale_shift_table$",
    # Text / time / guidance embeddings and their projections.
    r"(^|\.)(text_embedding|time_embedding|time_projection)\.",
    r"(^|\.)condition_embedder\.(text_embedder|time_embedder|time_proj)\.",
    r"(^|\.)(time_in|txt_in|vector_in|guidance_in|time_text_embed)\.",
    # ... the same layers under their other layout's names (HunyuanVideo's txt_in is diffusers'
    # context_embedder; Mochi's and LTX's time embedders), so a file's types do not depend on
    # which naming its source used
    r"(^|\.)(context_embedder|time_embed|t_embedder|t5_y_embedder|t5_yproj|ofs_embedding)\.",
    r"(^|\.)(adaln_single|caption_projection)\.",
    # Patch embeddings of transformers (Wan's 5-D Conv3d, HunyuanVideo's, VACE's, Mochi's): the
    # published files keep them unquantized, so they stay native n-dim tensors that diffusers',
    # ComfyUI-GGUF's and stable-diffusion.cpp's loaders read (none has a quantized Conv3d). VAE
    # convolutions are not matched: quantized Conv3d there is our own feature.
    r"(^|\.)(vace_)?patch_embedding\.",
    r"(^|\.)(img_in|x_embedder|patch_embed)\.proj\.",
    # Output heads.
    r"(^|\.)head\.head\.",
    r"(^|\.)(final_layer|norm_out|proj_out)\.",
)

#: Layers presets raise to a larger type: attention value/output projections and the FFN down
#: projection (diffusers, original Wan, HunyuanVideo/Flux and LLM-style names).
SENSITIVE_PATTERNS: tuple[str, ...] = (
    r"(^|\.)(to_v|v|v_proj|v_img|add_v_proj)\.weight$",
    r"(^|\.)(to_out\.0|o|o_proj|out_proj|to_add_out|img_attn_proj|txt_attn_proj)\.weight$",
    r"(^|\.)(img_attn|txt_attn)\.proj\.weight$",
    r"(^|\.)(ffn\.2|ffn\.net\.2|ff\.net\.2|ff_context\.net\.2|down_proj|fc2|linear2)\.weight$",
    r"(^|\.)(img_mlp|txt_mlp)\.(2|fc2)\.weight$",
)

#: Preset name -> (base type, type for sensitive layers or None).
PRESETS: dict[str, tuple[T, T | None]] = {
    "Q3_K_S": (T.Q3_K, None),
    "Q3_K_M": (T.Q3_K, T.Q4_K),
    "Q3_K_L": (T.Q3_K, T.Q5_K),
    "Q4_K_S": (T.Q4_K, None),
    "Q4_K_M": (T.Q4_K, T.Q5_K),
    "Q5_K_S": (T.Q5_K, None),
    "Q5_K_M": (T.Q5_K, T.Q6_K),
}

#: When a tensor's rows do not fit a type's block size, the next type to try (ggml's own choices:
#: a 32-element type of about the same size). Types absent here fall back to high precision.
FALLBACK_CHAIN: dict[T, T] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.IQ4_NL,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.IQ4_XS: T.IQ4_NL,
}

_PLAIN_FLOAT = {torch.float32: T.F32, torch.float16: T.F16, torch.bfloat16: T.BF16}


def source_qtype(dtype: torch.dtype) -> T:
    """The lossless ggml type for a source dtype (float8 -> F16 is exact; float64 -> F32 is not)."""
    if dtype in _PLAIN_FLOAT:
        return _PLAIN_FLOAT[dtype]
    if dtype == torch.float64:
        return T.F32
    if dtype.is_floating_point:  # float8 variants: every value is exact in F16
        return T.F16
    ints = {torch.int8: T.I8, torch.int16: T.I16, torch.int32: T.I32, torch.int64: T.I64}
    if dtype in ints:
        return ints[dtype]
    raise UnsupportedTypeError(
        f"no GGUF type stores {dtype} values (expected a float or int8/16/32/64)")


def quantizable_type_names() -> tuple[str, ...]:
    """The ggml type names a policy can write (every type with a quantizer), in ggml's order."""
    out = []
    for q in T:
        try:
            qt = get_quant_type(q)
        except UnsupportedTypeError:
            continue
        if qt.can_quantize:
            out.append(q.name)
    return tuple(out)


def _valid_names_text() -> str:
    return (f"valid types: {', '.join(quantizable_type_names())}; presets: "
            f"{', '.join(PRESETS)}; or '{KEEP}'")


def _named_qtype(qtype: QTypeLike) -> T:
    """:func:`to_qtype`, whose error for an unknown name lists the names that are valid."""
    try:
        return to_qtype(qtype)
    except UnsupportedTypeError as exc:
        raise UnsupportedTypeError(f"{exc}; {_valid_names_text()}") from None


def fits(shape: tuple[int, ...], qtype: T) -> bool:
    """Whether a tensor of ``shape`` can be stored as ``qtype``.

    Up to 4 dims, rows (the last dim) must be whole blocks. More dims are stored flattened, so
    only the element count must be.
    """
    bs = get_quant_type(qtype).block_size
    if bs == 1:
        return True
    if len(shape) > 4:
        return math.prod(shape) % bs == 0
    return len(shape) > 0 and shape[-1] % bs == 0


@dataclass(frozen=True)
class TensorDecision:
    """What the policy chose for one tensor and why.

    Attributes:
        qtype: the type the tensor is written as.
        requested: the type the rules asked for before any block-size fallback.
        reason: a short human-readable reason ("1-D", "keep pattern ...", "sensitive", ...).
        fallback: the chain that was walked when ``requested`` did not fit, e.g.
            ``"Q4_K -> Q5_0"``; empty when there was no fallback.
        keep: the tensor is kept at high precision (for an already-quantized source: as it is).
    """

    qtype: T
    requested: T
    reason: str
    fallback: str = ""
    keep: bool = False


@dataclass(frozen=True)
class QuantPolicy:
    """How a model's tensors are typed. Build with :meth:`from_type` (or the constructor).

    Attributes:
        qtype: the base type for weights; ``None`` keeps every tensor at its source precision.
        sensitive_qtype: type for :data:`SENSITIVE_PATTERNS` matches (presets), or ``None``.
        keep_patterns: regexes of tensors kept at high precision.
        sensitive_patterns: regexes of the layers ``sensitive_qtype`` applies to.
        overrides: ``(regex, type or "keep")`` pairs; the first match wins over every other rule.
        min_elements: tensors with at most this many elements stay high precision.
        keep_type: the high-precision type; ``None`` = the source's own (see module docs).
        name: a label for summaries and ``general.file_type`` (the preset or type name).
    """

    qtype: T | None = None
    sensitive_qtype: T | None = None
    keep_patterns: tuple[str, ...] = DEFAULT_KEEP_PATTERNS
    sensitive_patterns: tuple[str, ...] = SENSITIVE_PATTERNS
    overrides: tuple[tuple[str, str], ...] = ()
    min_elements: int = 1024
    keep_type: T | None = None
    name: str = ""
    _compiled: dict[str, re.Pattern[str]] = field(default_factory=dict, repr=False, compare=False,
                                                   hash=False)

    def __post_init__(self) -> None:
        for pattern in (*self.keep_patterns, *self.sensitive_patterns,
                        *(p for p, _ in self.overrides)):
            try:
                self._compiled[pattern] = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid policy regex {pattern!r}: {exc}") from None
        for pattern, target in self.overrides:
            if target != KEEP:
                self._check_quantizable(to_qtype(target), f"override {pattern!r}")
        if self.qtype is not None:
            self._check_quantizable(self.qtype, "the base type")
        if self.sensitive_qtype is not None:
            self._check_quantizable(self.sensitive_qtype, "the sensitive-layer type")

    @staticmethod
    def _check_quantizable(q: T, what: str) -> None:
        qt = get_quant_type(q)
        if not qt.can_quantize:
            raise UnsupportedTypeError(f"{what}: cannot quantize to {q.name}; "
                                       f"{_valid_names_text()}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_type(cls, qtype: QTypeLike | None, *,
                  overrides: Mapping[str, QTypeLike] | Iterable[tuple[str, QTypeLike]]
                  | None = None,
                  keep: Iterable[str] = (), min_elements: int = 1024,
                  keep_type: QTypeLike | None = None) -> QuantPolicy:
        """A policy for a type name (``"Q4_K"``), a preset (``"Q4_K_M"``) or ``None`` (keep all).

        Args:
            qtype: ggml type or preset name (case-insensitive).
            overrides: regex -> type (or ``"keep"``); first match wins.
            keep: extra regexes of tensors to keep at high precision.
            min_elements: tensors this small or smaller stay high precision.
            keep_type: the high-precision type (default: each tensor's source precision).
        """
        sensitive: T | None = None
        name = ""
        base: T | None
        if qtype is None:
            base = None
        elif isinstance(qtype, str) and qtype.strip().upper() in PRESETS:
            name = qtype.strip().upper()
            base, sensitive = PRESETS[name]
        else:
            base = _named_qtype(qtype)
            name = base.name
        pairs = overrides.items() if isinstance(overrides, Mapping) else (overrides or ())
        ov = tuple((p, KEEP if isinstance(t, str) and t.strip().lower() == KEEP
                    else _named_qtype(t).name) for p, t in pairs)
        return cls(qtype=base, sensitive_qtype=sensitive,
                   keep_patterns=DEFAULT_KEEP_PATTERNS + tuple(keep), overrides=ov,
                   min_elements=min_elements,
                   keep_type=None if keep_type is None else _named_qtype(keep_type), name=name)

    # -- decisions ---------------------------------------------------------------------------
    def high_precision(self, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> T:
        """The type a tensor of source ``dtype`` (and ``shape``) keeps when it is not quantized.

        A bfloat16 tensor that is not 2-D (a norm, a bias, Wan's modulation, a Conv3d patch
        embedding) is written F32 (exact): diffusers' GGUF loader takes BF16 for a quantized type
        and hands its raw bytes to the layers it does not replace, which then fail ("bias type
        unsigned char"); llama.cpp's converter keeps such tensors F32 too. 2-D ones (linears,
        which every reader decodes) stay BF16.
        """
        if self.keep_type is not None and dtype.is_floating_point:
            return self.keep_type
        if dtype == torch.bfloat16 and shape is not None and len(shape) != 2:
            return T.F32
        return source_qtype(dtype)

    def _match(self, patterns: Iterable[str], name: str) -> str | None:
        for p in patterns:
            if self._compiled[p].search(name):
                return p
        return None

    def _requested(self, name: str, shape: tuple[int, ...], dtype: torch.dtype
                   ) -> tuple[T, str, bool]:
        """(type asked for, reason, whether it is a keep-at-high-precision rule)."""
        keep = self.high_precision(dtype, shape)
        for pattern, target in self.overrides:
            if self._compiled[pattern].search(name):
                if target == KEEP:
                    return keep, f"override {pattern!r}", True
                return to_qtype(target), f"override {pattern!r}", False
        if not dtype.is_floating_point:
            return keep, "integer tensor", True
        if self.qtype is None:
            return keep, "source precision", True
        if len(shape) <= 1:
            return keep, "1-D", True
        if math.prod(shape) <= self.min_elements:
            return keep, f"tiny (<= {self.min_elements} elements)", True
        if (p := self._match(self.keep_patterns, name)) is not None:
            return keep, f"keep pattern {p!r}", True
        if self.sensitive_qtype is not None and self._match(self.sensitive_patterns, name):
            return self.sensitive_qtype, "sensitive layer", False
        return self.qtype, "weight", False

    def decide(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype
               ) -> TensorDecision:
        """The type ``name`` (of ``shape`` and source ``dtype``) is written as, and why."""
        shape = tuple(int(d) for d in shape)
        requested, reason, keep = self._requested(name, shape, dtype)
        if fits(shape, requested):
            return TensorDecision(requested, requested, reason, keep=keep)
        chain = [requested]
        q: T | None = requested
        # A fallback type this build cannot quantize to is passed over like one that does not fit.
        while q is not None and (not fits(shape, q) or (q != requested
                                                         and not get_quant_type(q).can_quantize)):
            q = FALLBACK_CHAIN.get(q)
            if q is not None:
                chain.append(q)
        final = q if q is not None else self.high_precision(dtype, shape)
        if q is None:
            chain.append(final)
        row = shape[-1] if shape else 1
        bs = get_quant_type(requested).block_size
        why = f"rows of {row} do not fit {requested.name} blocks of {bs}"
        return TensorDecision(final, requested, f"{reason}; {why}",
                              " -> ".join(t.name for t in chain), keep=keep or q is None)
