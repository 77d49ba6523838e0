"""Reading LoRA files: every key naming scheme Wan LoRAs are published in, into one form.

A LoRA file is a flat state dict. Its keys are ``<target><suffix>``: the target names a layer of
the model, the suffix says which part of the adapter the tensor is. The schemes in use:

===================  ====================================  =========================================
scheme               down / up                             target names
===================  ====================================  =========================================
kohya, musubi-tuner  ``.lora_down.weight`` /               ``lora_unet_blocks_0_self_attn_q``
                     ``.lora_up.weight`` + ``.alpha``      (dots as underscores)
LyCORIS LoCon        the same (+ ``.lora_mid.weight``:     idem
                     Tucker, refused)
ComfyUI / original   ``.lora_A.weight`` /                  ``diffusion_model.blocks.0.self_attn.q``
                     ``.lora_B.weight``
diffusers / peft     ``.lora_A.weight`` /                  ``transformer.blocks.0.attn1.to_q``
                     ``.lora_B.weight`` (also
                     ``.lora_A.default.weight``,
                     ``.lora.down.weight``,
                     ``.lora_linear_layer.down.weight``,
                     bare ``.lora_A``)
full deltas          ``.diff`` (weight), ``.diff_b``       any of the above
                     (bias); LyCORIS's ``.w_norm`` /
                     ``.b_norm`` are the same
LyCORIS LoHa         ``.hada_w1_a/_b``, ``.hada_w2_a/_b``  any of the above (SimpleTuner's:
                     (+ ``.hada_t1/_t2``: Tucker)          ``lycoris_blocks_0_attn1_to_q``)
LyCORIS LoKr         ``.lokr_w1`` or ``.lokr_w1_a/_b``,    idem
                     ``.lokr_w2`` or ``.lokr_w2_a/_b``
                     (+ ``.lokr_t2``: Tucker)
DoRA                 any of the above, plus a magnitude:   any of the above
                     ``.dora_scale`` (LyCORIS, kohya),
                     ``.lora_magnitude_vector`` (peft,
                     diffusers), ``.magnitude``
                     (ai-toolkit)
===================  ====================================  =========================================

The scale of an adapter is ``alpha / rank`` when the file has an ``.alpha`` (kohya's
convention), else 1 (peft's files fold it in). LoHa's rank is that of its first pair
(``hada_w1_b``'s rows); LoKr's that of its factorised factor (``lokr_w2_b``'s rows, else
``lokr_w1_b``'s), and a LoKr with both factors whole ignores its alpha (scale 1), as LyCORIS
does. What the LyCORIS products become on a layer is :mod:`ggufvideo.lora.lycoris`. Targets
keep their prefix here (``diffusion_model.``, ``transformer.``, ``lora_unet_``):
:mod:`ggufvideo.lora.targets` strips and maps them against the model's own names.

What a DoRA magnitude does to its layer is :mod:`ggufvideo.lora.dora`. Refused with a
:class:`~ggufvideo.errors.LoraError` naming the file and key: OFT, LoCon Tucker mid weights, a
down without an up, ranks that disagree, incomplete or mixed LoHa/LoKr factor sets, a DoRA
magnitude without an adapter. Keys of no known scheme are reported when the LoRA is applied
(an error unless ``strict=False``), and a text-encoder part (``lora_te_``, ``text_encoder.``...)
is skipped by the transformer with a warning (:mod:`ggufvideo.lora.targets`). lightx2v's
``<block>.diff_m`` is the block's ``modulation`` delta; peft tensors under any one adapter name
(``.lora_A.<name>.weight``) read as ``default``'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import LoraError, _safe
from .config import (
    METADATA_KEY,
    AdapterConfig,
    config_for,
    config_from_file,
    configs_from_metadata,
    sibling_config,
    weights_in,
)

__all__ = ["LoraEntry", "LoraFile", "parse_lora", "read_lora", "check_lycoris", "is_bias_key",
           "KOHYA_PREFIXES", "TEXT_ENCODER_PREFIXES"]

#: (suffix, role), longest first within each family of suffixes.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    # biases of the pair's layers (peft's lora_bias: lora_B's), scaled with the pair
    (".lora_B.default.bias", "up_bias"), (".lora_B.bias", "up_bias"),
    (".lora_linear_layer.up.bias", "up_bias"), (".lora_linear_layer.down.bias", "down_bias"),
    (".lora_up.bias", "up_bias"), (".lora_down.bias", "down_bias"),
    (".lora_A.bias", "down_bias"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    # DoRA magnitudes: LyCORIS/kohya/ComfyUI, peft/diffusers (as saved, and in memory), ai-toolkit
    (".lora_magnitude_vector.default.weight", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "dora_scale"), (".magnitude", "magnitude"),
    (".diff_b", "diff_b"), (".diff", "diff"),
    # LyCORIS's trained norms: a full new weight/bias delta, the same as diff / diff_b
    (".w_norm", "diff"), (".b_norm", "diff_b"),
    (".alpha", "alpha"),
    *((f".{f}", f) for f in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                             "hada_t2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
                             "lokr_w1", "lokr_w2", "lokr_t2")),
)
_UNSUPPORTED = ("oft_blocks", "oft_diag", "oft_R")
# peft's tensors under an adapter name other than "default" (a state dict dumped from a model
# whose adapter was named): ``.lora_A.<name>.weight`` ...
_PEFT_NAMED = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.([^.]+)\.(weight|bias)\Z")
_PEFT_ROLES = {("lora_A", "weight"): "down", ("lora_B", "weight"): "up",
               ("lora_A", "bias"): "down_bias", ("lora_B", "bias"): "up_bias",
               ("lora_magnitude_vector", "weight"): "magnitude"}
#: Target prefixes of a LoRA's text-encoder part (kohya ``lora_te*_``, diffusers
#: ``text_encoder``, ComfyUI ``text_encoders.``): not for the transformer.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.",
                         "text_encoder_2.", "text_encoder_3.", "text_encoders.", "te.", "te1.",
                         "te2.", "cond_stage_model.", "conditioner.")
#: Prefixes of kohya-style names, whose dots are written as underscores.
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_", "lora_te_")


@dataclass
class LoraEntry:
    """Everything a LoRA file says about one target layer.

    Attributes:
        target: the layer's name as the file writes it (prefix kept, maybe kohya-underscored).
        down: ``(rank, in, *kernel)`` or ``None``.
        up: ``(out, rank, *1)`` or ``None``.
        alpha: the file's ``alpha`` (``None``: absent).
        diff: a full delta of the weight (``None``: absent).
        diff_b: a full delta of the bias (``None``: absent).
        factors: LyCORIS LoHa (``hada_*``) or LoKr (``lokr_*``) tensors by name (empty: none).
        magnitude: a DoRA magnitude (``None``: a plain adapter); see :mod:`ggufvideo.lora.dora`.
        magnitude_axis: ``"out"`` (peft's ``lora_magnitude_vector``, ai-toolkit's ``magnitude``:
            always one per output row) or ``"shape"`` (LyCORIS's ``dora_scale``: its shape says
            whether it is per output row or per input feature).
        up_bias, down_bias: biases of the pair's up/down layers (peft's ``lora_bias=True`` puts
            one on ``lora_B``): folded into ``diff_b``, scaled with the pair.
        config_scale: the scale a peft config beside the tensors gives the pair when the file
            has no ``alpha`` for it (``None``: no config; see :mod:`ggufvideo.lora.config`).
        keys: the file keys this entry was read from.
    """

    target: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    config_scale: float | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict, repr=False)  # role -> the key that set it

    @property
    def kind(self) -> str:
        """``"lora"`` (a down/up pair), ``"loha"``, ``"lokr"`` or ``"diff"`` (full deltas only)."""
        if self.down is not None:
            return "lora"
        if self.factors:
            return "loha" if next(iter(self.factors)).startswith("hada_") else "lokr"
        return "diff"

    @property
    def low_rank(self) -> bool:
        """The entry is a factorised adapter (LoRA pair, LoHa, LoKr), not a full delta."""
        return self.down is not None or bool(self.factors)

    @property
    def has_weight(self) -> bool:
        """The entry changes its target's weight (not only its bias)."""
        return self.low_rank or self.diff is not None

    @property
    def rank(self) -> int:
        """The rank ``alpha`` is divided by (0: none, the alpha is not applied)."""
        f = self.factors
        if self.down is not None:
            return int(self.down.shape[0])
        if "hada_w1_b" in f:
            return int(f["hada_w1_b"].shape[0])
        for name in ("lokr_w2_b", "lokr_w1_b"):  # LyCORIS: the factorised factor's rank
            if name in f:
                return int(f[name].shape[0])
        return 0

    @property
    def scale(self) -> float:
        """``alpha / rank`` (kohya, LyCORIS); without an alpha the peft config's scale, else 1."""
        if self.alpha is None or not self.rank:
            return self.config_scale if self.config_scale is not None else 1.0
        return float(self.alpha) / self.rank

    @property
    def kohya(self) -> bool:
        """The target is written with underscores for dots (``lora_unet_blocks_0_...``)."""
        return self.target.startswith(KOHYA_PREFIXES) or "." not in self.target


@dataclass
class LoraFile:
    """A parsed LoRA file: its entries by target, and where it came from (for messages)."""

    source: str
    entries: dict[str, LoraEntry]
    unknown: list[str] = field(default_factory=list)
    """Keys of no known scheme: reported as unmatched when the LoRA is applied (an error
    unless ``strict=False``), never guessed at."""

    def __iter__(self) -> Iterator[LoraEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)


def is_bias_key(key: str) -> bool:
    """Whether the file key ``key`` changes its layer's bias (``diff_b``, ``b_norm``, peft's
    ``lora_B`` bias), not its weight."""
    split = _split_key(key)
    return split is not None and split[1] in ("diff_b", "up_bias", "down_bias")


def _split_key(key: str) -> tuple[str, str] | None:
    if key.endswith(".diff_m") and len(key) > 7:
        # lightx2v's modulation delta, written on its block: <block>.diff_m is <block>.modulation
        return key[:-len(".diff_m")] + ".modulation", "diff"
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], role
    m = _PEFT_NAMED.search(key)
    if m is not None and m.start() > 0 and (m.group(1), m.group(3)) in _PEFT_ROLES:
        return key[:m.start()], _PEFT_ROLES[m.group(1), m.group(3)]
    return None


def _peft_adapter_name(key: str) -> str | None:
    m = _PEFT_NAMED.search(key)
    return m.group(2) if m is not None and m.group(2) != "default" else None


def parse_lora(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>",
               configs: Mapping[str, AdapterConfig] | None = None) -> LoraFile:
    """Group a LoRA state dict's keys by target layer, checking shapes.

    ``configs`` (component prefix -> peft config, :mod:`ggufvideo.lora.config`) give the scale
    of LoRA pairs the file has no ``alpha`` for.

    Keys of no known scheme are kept aside (:attr:`LoraFile.unknown`): applying the LoRA reports
    them with the keys that match no layer.

    Raises:
        LoraError: an unsupported adapter type (OFT, LoCon Tucker mid weights), a DoRA magnitude
            without an adapter, a down without its up (or the reverse), ranks that do not agree,
            an incomplete or mixed LoHa/LoKr factor set, peft tensors of two adapter names. The
            message names ``source`` and the key.
    """
    entries: dict[str, LoraEntry] = {}
    unknown: list[str] = []
    names = {n for n in map(_peft_adapter_name, state_dict) if n is not None}
    if len(names) > 1:
        raise LoraError(f"the file holds peft adapters named {sorted(names)[:4]}: one LoRA file "
                        "is one adapter (save each on its own)", path=source)
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise LoraError(f"expected a tensor, found {type(value).__name__}", path=source,
                            tensor=key)
        if any(u in key for u in _UNSUPPORTED):
            raise LoraError("OFT adapters are not supported (LoRA/LoCon pairs, LoHa, LoKr and "
                            "full diffs are)", path=source, tensor=key)
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        target, role = split
        e = entries.setdefault(target, LoraEntry(target))
        if role in e.roles:  # two tensors for one part (adapter names, diff_m beside .diff...)
            raise LoraError(f"two tensors for the same part of one layer: {_safe(e.roles[role])} "
                            f"and {_safe(key)}", path=source, tensor=key)
        e.roles[role] = key
        e.keys.append(key)
        if role == "mid":
            raise LoraError("LoCon Tucker mid weights (.lora_mid) are not supported", path=source,
                            tensor=key)
        if role == "alpha":
            if value.numel() != 1:
                raise LoraError(f"alpha must be a scalar, found shape {list(value.shape)}",
                                path=source, tensor=key)
            e.alpha = float(value.reshape(()).item())
        elif role.startswith(("hada_", "lokr_")):
            e.factors[role] = value
        elif role in ("up_bias", "down_bias"):
            setattr(e, role, value)
        elif role in ("magnitude", "dora_scale"):
            if e.magnitude is not None:
                raise LoraError("two DoRA magnitudes for one layer", path=source, tensor=key)
            e.magnitude, e.magnitude_axis = value, "out" if role == "magnitude" else "shape"
        else:
            setattr(e, role, value)
    if unknown and not entries:
        raise LoraError("not a LoRA: no key has a LoRA suffix of any known scheme (expected such "
                        "as .lora_down.weight, .lora_A.weight, .alpha, .diff)", path=source,
                        tensor=unknown[0])
    for e in entries.values():
        first = e.keys[0]
        if (e.down is None) != (e.up is None):
            raise LoraError(f"has a {'down' if e.down is not None else 'up'} matrix but no "
                            f"{'up' if e.down is not None else 'down'}", path=source, tensor=first)
        if e.factors:
            check_lycoris(e, source)
        if e.magnitude is not None and not e.has_weight:
            raise LoraError("a DoRA magnitude without the LoRA pair (or LoHa, LoKr, diff) it "
                            "rescales", path=source, tensor=first)
        pair_bias = e.up_bias is not None or e.down_bias is not None
        if pair_bias and e.up is None:
            raise LoraError("a bias of a LoRA pair without the pair", path=source, tensor=first)
        if pair_bias and e.magnitude is not None:
            raise LoraError("a DoRA with biases on its pair is not supported (peft refuses it too)",
                            path=source, tensor=first)
        if not e.has_weight and e.diff_b is None:
            raise LoraError("an alpha without a LoRA pair or diff", path=source, tensor=first)
        if e.down is not None and e.up is not None:
            if e.down.dim() < 2 or e.up.dim() < 2 or e.up.shape[1] != e.down.shape[0] \
                    or any(d != 1 for d in e.up.shape[2:]):
                raise LoraError(f"down {list(e.down.shape)} and up {list(e.up.shape)} do not form "
                                "a rank-r pair (up's columns must equal down's rows)",
                                path=source, tensor=first)
            found = config_for(e.target, configs or {})
            if found is not None and e.alpha is None:  # an explicit alpha tensor wins
                e.config_scale = found[0].scale(found[1], e.rank)
        if pair_bias:
            # inside the scaled product: s (B (A x + a) + b) = s B A x + s (B a + b)
            assert e.up is not None
            b = torch.zeros(e.up.shape[0], dtype=torch.float32)
            if e.up_bias is not None:
                b = b + e.up_bias.to(torch.float32).reshape(-1)
            if e.down_bias is not None:
                a = e.down_bias.to(torch.float32).reshape(-1)
                b = b + e.up.to(torch.float32).flatten(1) @ a
            scaled = e.scale * b
            e.diff_b = scaled if e.diff_b is None else e.diff_b.to(torch.float32) + scaled
    return LoraFile(source, entries, unknown)


def check_lycoris(e: LoraEntry, source: str) -> None:
    """Raise a :class:`~ggufvideo.errors.LoraError` (naming ``source`` and the entry's first key)
    unless the LoHa/LoKr entry ``e`` has a complete factor set whose inner sizes agree (the
    layer's own shape is checked when it is applied)."""
    f, first = e.factors, e.keys[0]
    kinds = {name[:4] for name in f}
    if len(kinds) > 1 or e.down is not None or e.diff is not None:
        raise LoraError("mixes adapter types on one layer (LoHa, LoKr, LoRA pair or diff)",
                        path=source, tensor=first)

    def need(*names: str) -> None:
        missing = [n for n in names if n not in f]
        if missing:
            kind = "LoHa" if e.kind == "loha" else "LoKr"
            raise LoraError(f"{kind} adapter without its {', '.join(missing)}", path=source,
                            tensor=first)

    def agree(a: str, b: str, dim_a: int, dim_b: int) -> None:
        if f[a].dim() < 2 or f[b].dim() < 2 or f[a].shape[dim_a] != f[b].shape[dim_b]:
            raise LoraError(f"{a} {list(f[a].shape)} and {b} {list(f[b].shape)} do not agree on "
                            "their rank", path=source, tensor=first)

    def core(t: str, a: str, b: str) -> None:  # Tucker: (rank_a, rank_b, *kernel)
        if f[t].dim() < 3 or f[t].shape[0] != f[a].shape[0] or f[t].shape[1] != f[b].shape[0]:
            raise LoraError(f"{t} {list(f[t].shape)} does not fit {a} {list(f[a].shape)} and "
                            f"{b} {list(f[b].shape)} (a Tucker core is (rank, rank, *kernel))",
                            path=source, tensor=first)

    if e.kind == "loha":
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        tucker = "hada_t1" in f or "hada_t2" in f
        if tucker:
            need("hada_t1", "hada_t2")
        for i in ("1", "2"):
            # Tucker: w_a is (rank, out) and w_b (rank, in); else w_a (out, rank), w_b (rank, in)
            agree(f"hada_w{i}_a", f"hada_w{i}_b", 0 if tucker else 1, 0)
            if tucker:
                core(f"hada_t{i}", f"hada_w{i}_a", f"hada_w{i}_b")
        return
    for i in ("1", "2"):
        if f"lokr_w{i}" not in f:
            need(f"lokr_w{i}_a", f"lokr_w{i}_b")
            agree(f"lokr_w{i}_a", f"lokr_w{i}_b", 0 if (i == "2" and "lokr_t2" in f) else 1, 0)
        elif f"lokr_w{i}_a" in f or f"lokr_w{i}_b" in f:
            raise LoraError(f"has both lokr_w{i} and its factors lokr_w{i}_a/_b", path=source,
                            tensor=first)
    if "lokr_w1" in f and f["lokr_w1"].dim() != 2:
        raise LoraError(f"lokr_w1 must be a matrix, found shape {list(f['lokr_w1'].shape)}",
                        path=source, tensor=first)
    if "lokr_t2" in f and "lokr_w2" in f:
        raise LoraError("lokr_t2 (Tucker) needs lokr_w2_a/_b, not lokr_w2", path=source,
                        tensor=first)
    if "lokr_t2" in f:
        core("lokr_t2", "lokr_w2_a", "lokr_w2_b")


def read_lora(lora: str | os.PathLike[str] | Mapping[str, torch.Tensor] | LoraFile) -> LoraFile:
    """A LoRA from a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` state dict
    (``torch.load(weights_only=True)``), a peft/diffusers folder (its ``adapter_model`` or
    ``pytorch_lora_weights`` file), an in-memory state dict, or an already parsed file. A peft
    config in the safetensors header or beside ``adapter_model.*`` gives the scale of pairs
    without an ``alpha`` (:mod:`ggufvideo.lora.config`)."""
    if isinstance(lora, LoraFile):
        return lora
    if isinstance(lora, Mapping):
        return parse_lora(lora)
    path = os.fspath(lora)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if os.path.isdir(path):
        path = weights_in(path)
    configs: dict[str, AdapterConfig] = {}
    beside = sibling_config(path)
    if beside is not None:
        configs[""] = config_from_file(beside)
    if path.lower().endswith(".safetensors"):
        sd, header = _read_safetensors(path)
        if METADATA_KEY in header:  # the file's own config, over a folder's
            configs.update(configs_from_metadata(header[METADATA_KEY], path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a bad pickle is the file's problem
            raise LoraError(f"cannot read as a torch state dict: {_safe(exc)}", path=path) from None
        if not isinstance(sd, Mapping):
            raise LoraError(f"expected a state dict, found {type(sd).__name__}", path=path)
    return parse_lora(sd, path, configs)


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and its header's text metadata, read with the package's own
    safetensors reader (no extra needed)."""
    from ..sources import SOURCE_METADATA_PREFIX, open_source

    src = open_source(path)
    try:
        n = len(SOURCE_METADATA_PREFIX)
        header = {k[n:]: str(v) for k, v in src.metadata.items()
                  if k.startswith(SOURCE_METADATA_PREFIX)}
        return {t.name: t.load() for t in src.tensors}, header
    finally:
        src._keep_open.clear()
