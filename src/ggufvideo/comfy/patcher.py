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

This module imports ComfyUI only inside functions.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..tensor import GGMLTensor
from .layers import ComfyQuantLayer, raw_state_bytes

__all__ = ["DeferredPatch", "patcher_class", "make_quant_patcher", "Backup"]

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
                                           inplace_update=inplace_update, return_weight=return_weight)
    calculate = _calculate_weight()
    if return_weight:
        # A caller that wants the patched values themselves (merging, saving): decode this one
        # weight and patch it, leaving the layer untouched.
        w = weight.to(device_to) if device_to is not None else weight
        return calculate(self.patches[key], w.dequantize(torch.float32), key,
                         intermediate_dtype=torch.float32)
    if device_to is not None and weight.device != torch.device(device_to):
        module._parameters[param] = nn.Parameter(weight.to(device_to), requires_grad=False)
    token = self.backup.get(key)
    if token is None:
        # The unchanged weight is its own backup: no copy, nothing decoded.
        token = Backup(weight, False)
        self.backup[key] = token
    module.ggufvideo_patches[param] = DeferredPatch(self.patches, key, self.backup, token, calculate)
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
                                   inplace_update: bool = False, return_weight: bool = False) -> Any:
            return _patch_weight_to_device(self, base, key, device_to, inplace_update, return_weight)

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
