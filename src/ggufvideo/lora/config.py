"""The scale a peft/diffusers LoRA keeps outside its tensors: ``lora_alpha``, its patterns, rsLoRA.

kohya-style files store each layer's ``alpha`` as a tensor. peft's files do not: the adapter's
``LoraConfig`` holds it, and a layer's scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), ``alpha_pattern`` overriding ``lora_alpha`` for the layers whose names end in one
of its keys (a regular expression, matched after a dot or at the start, as peft matches it). The
config travels

* in the safetensors header, under ``lora_adapter_metadata`` (JSON; diffusers'
  ``save_lora_weights`` / ``save_lora_adapter``), its keys prefixed by the component they belong
  to (``transformer.lora_alpha``) when a pipeline saved it;
* or as ``adapter_config.json`` beside the weights (peft's ``save_pretrained`` folder).

A file with neither is taken as peft writes files without alphas: scale 1 (``lora_alpha = r``).
An explicit ``.alpha`` tensor always wins over a config.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraError, _safe

__all__ = ["METADATA_KEY", "CONFIG_FILE", "WEIGHT_FILES", "AdapterConfig", "configs_from_metadata",
           "config_from_file", "config_for", "sibling_config", "weights_in"]

#: The safetensors header key diffusers writes an adapter's LoraConfig under.
METADATA_KEY = "lora_adapter_metadata"
#: peft's config file, beside ``adapter_model.safetensors``.
CONFIG_FILE = "adapter_config.json"
#: What peft puts before the names of the model it wraps.
_PEFT_ROOT = "base_model.model."
#: The keys of a LoraConfig that decide a layer's scale.
_SCALE_KEYS = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora")


@dataclass(frozen=True)
class AdapterConfig:
    """What of a peft ``LoraConfig`` sets a layer's scale (peft's defaults where a key is absent).

    Attributes:
        lora_alpha: the alpha of every layer no ``alpha_pattern`` key matches.
        alpha_pattern: layer name pattern -> its alpha.
        use_rslora: scale ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    """

    lora_alpha: float = 8.0
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, target: str) -> float:
        """The alpha of the layer named ``target`` (its name in the model peft wrapped)."""
        for pattern, alpha in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", target):
                return alpha
        return self.lora_alpha

    def scale(self, target: str, rank: int) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA) for the layer ``target``."""
        alpha = self.alpha_for(target)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _config(values: Mapping[str, Any], where: str) -> AdapterConfig:
    try:
        alpha = float(values.get("lora_alpha", 8))
        pattern = {str(k): float(v) for k, v in (values.get("alpha_pattern") or {}).items()}
        for key in pattern:
            re.compile(key)
        return AdapterConfig(alpha, pattern, bool(values.get("use_rslora", False)))
    except (TypeError, ValueError, AttributeError, re.error) as exc:
        raise LoraError(f"its LoRA config is not readable ({_safe(exc)})", path=where) from None


def configs_from_metadata(raw: str, source: str) -> dict[str, AdapterConfig]:
    """The configs in a safetensors header's ``lora_adapter_metadata`` (a JSON text): component
    prefix (``""`` when unprefixed, ``"transformer"``...) -> its config.

    Raises:
        LoraError: the text is not a JSON object, or a value of it is not what a LoraConfig
            holds (names ``source``).
    """
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise LoraError(f"{METADATA_KEY} in its header is not JSON ({_safe(exc)})",
                        path=source) from None
    if not isinstance(values, dict):
        raise LoraError(f"{METADATA_KEY} in its header is not a JSON object", path=source)
    groups: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        prefix, _, name = str(key).rpartition(".")
        groups.setdefault(prefix, {})[name] = value
    return {prefix: _config(v, source) for prefix, v in groups.items()
            if any(k in v for k in _SCALE_KEYS)}


def config_from_file(path: str) -> AdapterConfig:
    """peft's ``adapter_config.json`` at ``path``.

    Raises:
        LoraError: unreadable, not JSON, or not a LoRA config (names the file).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, ValueError) as exc:
        raise LoraError(f"cannot read as a peft adapter config ({_safe(exc)})",
                        path=path) from None
    if not isinstance(values, dict):
        raise LoraError("not a peft adapter config (expected a JSON object)", path=path)
    kind = values.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraError(f"a peft {_safe(kind)} adapter, not a LoRA", path=path)
    return _config(values, path)


def config_for(target: str, configs: Mapping[str, AdapterConfig]
               ) -> tuple[AdapterConfig, str] | None:
    """The config of the layer ``target`` (its name as the file writes it) and the layer's name as
    peft knew it (what ``alpha_pattern`` keys are matched against: without the component prefix
    and peft's ``base_model.model.``), else ``None``.

    The config is the one whose component prefix ``target`` starts with; for a name with none of
    them (a file renamed to the original release's or kohya's names after diffusers saved it,
    as diffusers' own Wan loader reads such files) the unprefixed config, else the
    ``transformer`` one, else the only one.
    """
    def relative(name: str) -> str:
        return name[len(_PEFT_ROOT):] if name.startswith(_PEFT_ROOT) else name

    for prefix, config in configs.items():
        if prefix and target.startswith(prefix + "."):
            return config, relative(target[len(prefix) + 1:])
    fallback = configs.get("") or configs.get("transformer")
    if fallback is None and len(configs) == 1:
        fallback = next(iter(configs.values()))
    return None if fallback is None else (fallback, relative(target))


#: Weights file names of a LoRA folder, in the order they are looked for (peft's, diffusers').
WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors",
                "adapter_model.bin", "pytorch_lora_weights.bin")


def sibling_config(path: str) -> str | None:
    """The ``adapter_config.json`` beside ``path`` when ``path`` is peft's weights file
    (``adapter_model.*``: another file in the folder may not be the adapter it describes)."""
    if not os.path.basename(path).startswith("adapter_model."):
        return None
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG_FILE)
    return candidate if os.path.isfile(candidate) else None


def weights_in(folder: str) -> str:
    """The LoRA weights file of a peft/diffusers folder.

    Raises:
        LoraError: none of :data:`WEIGHT_FILES` is in it (names the folder and what was looked
            for).
    """
    for name in WEIGHT_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise LoraError(f"a folder without LoRA weights (looked for {', '.join(WEIGHT_FILES)})",
                    path=folder)
