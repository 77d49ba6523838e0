"""LoRA and other weight patches on quantized layers, through ComfyUI's ``ModelPatcher``.

ComfyUI applies a LoRA by ``ModelPatcher.patch_weight_to_device(key)``: it copies the weight,
adds the patch to the copy, and sets the result as the parameter, keeping the original in
``patcher.backup`` to restore on unpatch. For a quantized weight that would mean decoding it (for
every layer at once, the whole model) and re-quantizing, or keeping it decoded.

The adapter's patcher does something else for :class:`~ggufvideo.GGMLTensor` weights: it leaves
the raw blocks as they are and installs a :class:`DeferredPatch` on the layer; the layer applies it
to its freshly decoded weight in ``forward`` (see :mod:`ggufvideo.comfy.layers`), one layer at a
time, in float32. Everything else (plain weights, keys without patches) goes to ComfyUI's own code.

Validity rides on ComfyUI's own bookkeeping: the patch registers a backup entry (the unchanged
weight itself, so nothing is copied) and is active only while that very entry is in
``patcher.backup``. Every path on which ComfyUI undoes a patch restores and drops the backup
(``unpatch_model`` clears it, ``partially_unload`` pops it before installing its own
``LowVramPatch`` in ``weight_function``), so a patch can neither outlive an unpatch nor be applied
twice.

LoRA patches are not merged at all: when every patch on a quantized *linear* weight is a plain
LoRA pair (ComfyUI's ``LoRAAdapter``, or the older ``("lora", (up, down, alpha, ...))`` tuple --
what its LoRA loader makes of kohya, diffusers and ComfyUI files), a LoHa or a LoKr (its
``LoHaAdapter``/``LoKrAdapter``, what it makes of LyCORIS files), with no DoRA, Tucker factors,
offset, function or ``strength_model``, a :class:`DeferredLora` is installed instead: the layer
computes ``W_q x + sum(strength * alpha / rank * up (down x))`` (see
:func:`ggufvideo.ops.lora_linear`; a LoHa as one low-rank pair, a LoKr factor by factor, as
:mod:`ggufvideo.lora.lycoris` says), so the base weight is neither decoded for the LoRA nor merged.
The adapters are rebuilt from ``patches[key]`` whenever its entries change, so a strength change
(a new patch list from ComfyUI) takes effect and an unpatch (backup dropped) turns them off
exactly. Any other patch type keeps the decode-and-patch path.

This module imports ComfyUI only inside functions.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import LoraError
from ..loader import resolve_device
from ..lora.formats import LoraEntry, check_lycoris
from ..lora.lycoris import loha_pair, loha_products_agree, lokr_factors, pair_is_smaller
from ..ops import Adapter, KronAdapter, LoraAdapter
from ..tensor import GGMLTensor
from .layers import ComfyQuantLayer, raw_state_bytes

__all__ = ["DeferredPatch", "DeferredLora", "lora_pair", "patch_adapter", "patcher_class",
           "make_quant_patcher", "Backup"]

#: The shape of ComfyUI's backup records (``weight``, ``inplace_update``).
Backup = namedtuple("Backup", ["weight", "inplace_update"])


class DeferredPatch:
    """A weight patch applied to a layer's decoded weight at forward time.

    Args:
        patches: the patcher's ``patches`` mapping (key -> list of ComfyUI patch tuples); read at
            call time, like ComfyUI's ``LowVramPatch``.
        key: the weight's full key (``diffusion_model.blocks.0.self_attn.q.weight``).
        backup: the patcher's backup mapping and ``token`` the entry this patch registered there.
        calculate: ComfyUI's ``comfy.lora.calculate_weight`` (patches, weight, key, ...).
    """

    def __init__(self, patches: Mapping[str, Any], key: str, backup: Mapping[str, Any],
                 token: Any, calculate: Callable[..., torch.Tensor]) -> None:
        self.patches = patches
        self.key = key
        self.backup = backup
        self.token = token
        self.calculate = calculate

    def active(self) -> bool:
        """Whether the patcher still has this patch applied (its backup entry is in place)."""
        return self.backup.get(self.key) is self.token and self.key in self.patches

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """The patched weight (``weight`` is the decoded float32 weight on the compute device)."""
        return self.calculate(self.patches[self.key], weight, self.key,
                              intermediate_dtype=weight.dtype)


def _patch_value(patch: Any) -> tuple[float, str, tuple[Any, ...]] | None:
    """``(strength, kind, weights)`` of a ComfyUI patch entry of a plain kind, else ``None``.

    A patch entry is ``(strength, value, strength_model, offset, function)``; ``value`` is a
    weight adapter (``.name``: ``"lora"``, ``"loha"``, ``"lokr"``, ...; ``.weights``: its tensors)
    or, in older ComfyUI, ``(name, weights)``.
    """
    p = tuple(patch) + (None,) * 5
    strength, value, strength_model, offset, function = p[:5]
    if strength_model not in (None, 1.0) or offset is not None or function is not None:
        return None
    if isinstance(getattr(value, "name", None), str) and hasattr(value, "weights"):
        if getattr(value, "row_offset", None) is not None:  # a LoKr narrowed to some rows
            return None
        return float(strength), value.name, tuple(value.weights)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return float(strength), value[0], tuple(value[1])
    return None


def lora_pair(patch: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(up, down, scale)`` of a ComfyUI patch entry that is a plain LoRA pair, else ``None``.

    A ``"lora"`` adapter's weights are ``(up, down, alpha, mid, dora_scale, reshape)``. The scale
    is ``strength * alpha / rank`` (``strength`` alone without an alpha), as ComfyUI computes it.
    """
    got = _patch_value(patch)
    if got is None or got[1] != "lora":
        return None
    strength, _, weights = got
    up, down, alpha, mid, dora, reshape = (weights + (None,) * 6)[:6]
    if mid is not None or dora is not None or reshape is not None:
        return None
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    up, down = up.flatten(1), down.flatten(1)
    if up.shape[1] != down.shape[0]:
        return None
    scale = strength * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return up, down, scale


#: ComfyUI's weights tuples of its LoHa and LoKr adapters, by position.
_LOHA = ("hada_w1_a", "hada_w1_b", "alpha", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
         "dora")
_LOKR = ("lokr_w1", "lokr_w2", "alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
         "lokr_t2", "dora")


def patch_adapter(patch: Any, shape: tuple[int, ...]) -> Adapter | None:
    """The adapter that runs a ComfyUI patch entry unmerged on a linear weight of ``shape``:
    a LoRA pair, a LoHa (as one low-rank pair, while that is smaller than the weight) or a LoKr
    (:class:`~ggufvideo.ops.KronAdapter`); ``None`` for any other patch (then the layer decodes
    and patches as ComfyUI would). Scales as ComfyUI computes them."""
    pair = lora_pair(patch)
    if pair is not None:
        up, down, scale = pair
        if up.shape[0] != shape[0] or down.shape[1] != shape[1]:
            return None
        return LoraAdapter(up=up, down=down, scale=scale)
    got = _patch_value(patch)
    if got is None or got[1] not in ("loha", "lokr") or len(shape) != 2:
        return None
    strength, kind, weights = got
    names = _LOHA if kind == "loha" else _LOKR
    values = dict(zip(names, weights + (None,) * len(names)))
    alpha = values.pop("alpha")
    if values.pop("dora") is not None or values.get("hada_t1") is not None \
            or values.get("lokr_t2") is not None:
        return None
    f = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    entry = LoraEntry("", alpha=None if alpha is None else float(alpha), factors=f,
                      keys=[kind])
    try:
        check_lycoris(entry, "")
    except LoraError:
        return None
    scale = strength * entry.scale
    out, inner = int(shape[0]), int(shape[1])
    if kind == "loha":
        lowrank = loha_pair(f) if loha_products_agree(f) else None
        if lowrank is None:
            return None
        down, up = lowrank
        if up.shape[0] != out or down.shape[1] != inner \
                or not pair_is_smaller(down.shape[0], out, inner):
            return None  # (ComfyUI's dense patch is the cheaper)
        return LoraAdapter(up=up, down=down, scale=scale)
    w1, w2 = lokr_factors(f)
    if w1.shape[0] * w2.shape[0] != out or w1.shape[1] * w2.shape[1] != inner:
        return None
    return KronAdapter(w1=w1, w2=w2, scale=scale)


class DeferredLora(DeferredPatch):
    """LoRA patches on a quantized linear weight, run unmerged as adapters beside it.

    Same validity as :class:`DeferredPatch`; :meth:`adapters` builds one adapter per patch
    (:func:`patch_adapter`) from ``patches[key]`` at call time (cached while the entries --
    strengths and patch objects -- stay the same).
    """

    def __init__(self, *args: Any, shape: tuple[int, ...] = (),
                 built: list[Adapter] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shape = shape  # the weight's
        self._cache: tuple[Any, list[Adapter]] | None = None
        if built is not None:  # the adapters of the current entries, made by the caller
            self._cache = (_entries_key(self.patches[self.key]), built)

    def adapters(self) -> list[Adapter] | None:
        """The adapters, or ``None`` when a patch is no longer one that runs unmerged (then the
        layer decodes and patches as for any other patch)."""
        entries = self.patches[self.key]
        key = _entries_key(entries)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        built = _unmerged(entries, self.shape, self.key)
        if built is None:
            return None
        self._cache = (key, built)
        return built


def _entries_key(entries: Any) -> tuple[Any, ...]:
    """What identifies a patch list: each entry's strength, patch object and other fields."""
    return tuple((p[0], id(p[1])) + tuple(p[2:]) for p in entries)


def _unmerged(entries: Any, shape: tuple[int, ...], key: str) -> list[Adapter] | None:
    """One adapter per entry, or ``None`` if an entry does not run unmerged."""
    built = []
    for p in entries:
        a = patch_adapter(p, shape)
        if a is None:
            return None
        a.name = key
        built.append(a)
    return built


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, param = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), param


def _patch_weight_to_device(self: Any, base: type, key: str, device_to: torch.device | None = None,
                            inplace_update: bool = False, return_weight: bool = False) -> Any:
    module, param = _owner(self.model, key)
    weight = getattr(module, param, None)
    if (key not in self.patches or not isinstance(weight, GGMLTensor)
            or not isinstance(module, ComfyQuantLayer)):
        return base.patch_weight_to_device(self, key, device_to=device_to,
                                           inplace_update=inplace_update,
                                           return_weight=return_weight)
    calculate = _calculate_weight()
    if return_weight:
        # A caller that wants the patched values themselves (merging, saving): decode this one
        # weight and patch it, leaving the layer untouched.
        w = weight.to(device_to) if device_to is not None else weight
        return calculate(self.patches[key], w.dequantize(torch.float32), key,
                         intermediate_dtype=torch.float32)
    if device_to is not None and weight.device != resolve_device(device_to):
        module._parameters[param] = nn.Parameter(weight.to(device_to), requires_grad=False)
    token = self.backup.get(key)
    if token is None:
        # The unchanged weight is its own backup: no copy, nothing decoded.
        token = Backup(weight, False)
        self.backup[key] = token
    entries = self.patches[key]
    built = (_unmerged(entries, tuple(weight.shape), key)
             if param == "weight" and entries and isinstance(module, nn.Linear) else None)
    if built is not None:  # (built once here, kept as the patch's first adapters)
        patch: DeferredPatch = DeferredLora(self.patches, key, self.backup, token, calculate,
                                            shape=tuple(weight.shape), built=built)
    else:
        patch = DeferredPatch(self.patches, key, self.backup, token, calculate)
    module.ggufvideo_patches[param] = patch
    return None


def _model_size(self: Any) -> int:
    if getattr(self, "size", 0) > 0:
        return self.size
    self.size = raw_state_bytes(self.model)
    return self.size


def _calculate_weight() -> Callable[..., torch.Tensor]:
    import comfy.lora  # ComfyUI is present whenever a ComfyUI patcher exists

    return comfy.lora.calculate_weight


_PATCHER_CLASSES: dict[type, type] = {}


def patcher_class(base: type) -> type:
    """The subclass of ComfyUI patcher class ``base`` that patches quantized weights lazily.

    Its only base is ``base`` (a mixin base would change the instance layout, and an existing
    patcher's ``__class__`` could not be switched). It overrides ``patch_weight_to_device`` (see
    the module docstring) and ``model_size`` (quantized weights counted as raw blocks: ComfyUI's
    ``nbytes`` of a GGMLTensor is its decoded size).
    """
    if getattr(base, "_ggufvideo_patcher", False):
        return base
    cls = _PATCHER_CLASSES.get(base)
    if cls is None:
        def patch_weight_to_device(self: Any, key: str, device_to: torch.device | None = None,
                                   inplace_update: bool = False,
                                   return_weight: bool = False) -> Any:
            return _patch_weight_to_device(self, base, key, device_to, inplace_update,
                                           return_weight)

        cls = type(f"GGUFVideo{base.__name__}", (base,),
                   {"__module__": __name__, "_ggufvideo_patcher": True,
                    "patch_weight_to_device": patch_weight_to_device, "model_size": _model_size})
        _PATCHER_CLASSES[base] = cls
    return cls


def make_quant_patcher(patcher: Any) -> Any:
    """Turn a ComfyUI ``ModelPatcher`` (as returned by its loaders) into the adapter's, in place.

    ``clone()`` builds clones with ``self.__class__``, so LoRA nodes downstream keep the behaviour.
    The cached size is recomputed with quantized weights at their raw size.
    """
    patcher.__class__ = patcher_class(type(patcher))
    patcher.size = 0
    patcher.model_size()
    return patcher
