"""``apply_lora``: LoRAs on a model without peft, unmerged, removable, rescalable, stackable.

Each low-rank pair (a LoHa too, or each full ``diff`` of a 2-D+ weight) becomes a
:class:`~ggufvideo.ops.LoraAdapter`, each LoKr a :class:`~ggufvideo.ops.KronAdapter`
(:mod:`ggufvideo.lora.pieces`), in the target layer's ``lora_adapters`` list: the layer computes
``W_q x + sum(s_i * B_i (A_i x))`` with its quantized weight untouched (see
:func:`ggufvideo.ops.lora_linear`). One with a DoRA magnitude is wrapped in a
:class:`~ggufvideo.ops.DoraAdapter` (:mod:`ggufvideo.lora.dora`). A plain
``nn.Linear``/``nn.ConvNd`` (an unquantized model) is switched to its quant-aware class first --
same parameters, same outputs -- and switched back when its last adapter goes.

Small dense tensors a LoRA changes wholesale (``diff_b`` of a bias, ``diff`` of a norm's weight)
are replaced by ``original + sum(s_i * delta_i)`` computed in float32 and rounded once; the
original parameter object is kept and put back when the last such delta goes, so
:meth:`LoraHandle.remove` restores every output bit for bit.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import LoraError, _safe
from ..ops import Adapter, DoraAdapter, QuantLayer, lora_adapters, quant_class_for
from .dora import check_stackable, float32_weight, magnitude_key
from .formats import LoraFile, read_lora
from .pieces import adapter_for, dense_delta, needs_weight
from .targets import Resolution, resolve

__all__ = ["LoraHandle", "LoraLike", "apply_lora", "fuse_lora"]

_HANDLE_IDS = itertools.count()
_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LoraLike = str | os.PathLike[str] | Mapping[str, torch.Tensor] | LoraFile


class LoraHandle:
    """One applied LoRA: :meth:`set_scale` changes its strength, :meth:`remove` undoes it exactly.

    Attributes:
        source: the LoRA file (or ``"<state dict>"``).
        scale: the current strength.
        targets: the model tensors it changes.
        unmatched: LoRA keys that matched no tensor, or of no known scheme (empty unless
            ``strict=False``).
        skipped: keys of the LoRA's text-encoder part, left alone (with a warning).
        layout: which naming of the model the LoRA's names matched (``"wan:original"`` ...).
    """

    def __init__(self, model: nn.Module, source: str, scale: float, resolution: Resolution) -> None:
        self.uid = next(_HANDLE_IDS)
        self.model = model
        self.source = source
        self.scale = float(scale)
        self.unmatched = list(resolution.unmatched)
        self.skipped = list(resolution.skipped)
        self.layout = resolution.layout
        self.targets: list[str] = []
        self._adapters: list[tuple[nn.Module, Adapter, float]] = []  # (layer, adapter, base)
        self._dense: list[tuple[nn.Module, str]] = []
        self._removed = False

    def __repr__(self) -> str:
        return (f"LoraHandle({_safe(self.source)!r}, scale={self.scale}, "
                f"{len(self.targets)} tensors, layout {self.layout})")

    def set_scale(self, scale: float) -> None:
        """Change the LoRA's strength (``1.0``: as in the file; ``0``: off)."""
        self._check()
        _check_unstreamed(self._dense, self.source)
        self.scale = float(scale)
        for _, a, base in self._adapters:
            a.scale = self.scale * base
        for module, pname in self._dense:
            _DenseDeltas.of(module).rescale(module, pname, self.uid, self.scale)

    def remove(self) -> None:
        """Take the LoRA off: every layer computes exactly what it did before it was applied."""
        self._check()
        _check_unstreamed(self._dense, self.source)
        for module, a, _ in self._adapters:
            lst = module.__dict__.get("lora_adapters", [])
            lst[:] = [x for x in lst if x is not a]
            if not lst:
                module.__dict__.pop("_lora_pack", None)
                original = module.__dict__.pop("_lora_swapped_from", None)
                if original is not None:
                    module.__class__ = original
        for module, pname in self._dense:
            _DenseDeltas.of(module).drop(module, pname, self.uid)
        self._adapters.clear()
        self._dense.clear()
        self._removed = True

    def _check(self) -> None:
        if self._removed:
            raise RuntimeError(f"LoRA {_safe(self.source)} was already removed")


def _check_unstreamed(targets: list[tuple[nn.Module, str]], source: str) -> None:
    """Raise before anything changes if a tensor a LoRA replaces wholesale (a bias or norm delta)
    is placed by :func:`ggufvideo.offload`, which would put its own copy back on the next pass."""
    from ..runtime.offload import STREAMED_MARK

    for module, pname in targets:
        if pname in module.__dict__.get(STREAMED_MARK, ()):
            raise LoraError(f"the model is under ggufvideo.offload, which places its {pname} "
                            f"tensors itself: this LoRA's bias/norm deltas cannot be applied, "
                            "rescaled or removed now (call the offload handle's remove(), change "
                            "the LoRA, then offload again; low-rank pairs are not affected)",
                            path=source)


class _DenseDeltas:
    """Per module: the original of each replaced small parameter and the deltas on it."""

    def __init__(self) -> None:
        self.params: dict[str, tuple[nn.Parameter, dict[int, tuple[torch.Tensor, float]]]] = {}

    @staticmethod
    def of(module: nn.Module) -> _DenseDeltas:
        found = module.__dict__.get("_lora_dense")
        if found is None:
            found = module.__dict__["_lora_dense"] = _DenseDeltas()
        return found

    def add(self, module: nn.Module, pname: str, uid: int, delta: torch.Tensor,
            scale: float) -> None:
        if pname not in self.params:
            original = module._parameters[pname]
            assert original is not None  # a name of the state dict: a set parameter
            self.params[pname] = (original, {})
        self.params[pname][1][uid] = (delta, scale)
        self._rebuild(module, pname)

    def rescale(self, module: nn.Module, pname: str, uid: int, scale: float) -> None:
        original, deltas = self.params[pname]
        deltas[uid] = (deltas[uid][0], scale)
        self._rebuild(module, pname)

    def drop(self, module: nn.Module, pname: str, uid: int) -> None:
        if pname in self.params:
            self.params[pname][1].pop(uid, None)
            self._rebuild(module, pname)

    def _rebuild(self, module: nn.Module, pname: str) -> None:
        original, deltas = self.params[pname]
        if not deltas:
            module._parameters[pname] = original  # the very object: exact restore
            del self.params[pname]
            return
        base = float32_weight(original)
        total = base.clone()
        for d, s in deltas.values():
            total += s * d.to(total.device)
        module._parameters[pname] = nn.Parameter(total.to(original.dtype), requires_grad=False)


def _layer_for_adapters(module: nn.Module, key: str, source: str) -> nn.Module:
    if isinstance(module, QuantLayer) and isinstance(module, _ADAPTABLE):
        return module
    kind = type(module)  # (tested as a class: ``module`` keeps its type for the swap below)
    if issubclass(kind, _ADAPTABLE) and not issubclass(kind, QuantLayer):
        cls = quant_class_for(kind)
        if cls is None:
            raise LoraError(f"layer {_safe(key)} ({kind.__name__}) cannot take adapters",
                            path=source)
        module.__dict__["_lora_swapped_from"] = kind
        module.__class__ = cls
        return module
    raise LoraError(f"a low-rank LoRA targets {_safe(key)}, a {type(module).__name__}; only "
                    "Linear and Conv layers take adapters", path=source)


def apply_lora(model: nn.Module, lora: LoraLike, scale: float = 1.0, *, strict: bool = True
               ) -> LoraHandle:
    """Apply a LoRA to ``model`` unmerged; returns a handle with ``.set_scale(s)``, ``.remove()``.

    Works on any torch model (quantized by ggufvideo or not, diffusers' or the original release's
    naming): the LoRA's names -- kohya/musubi (``lora_unet_blocks_0_self_attn_q``), ComfyUI/
    original (``diffusion_model.blocks.0.self_attn.q``) or diffusers/peft
    (``transformer.blocks.0.attn1.to_q``) -- are mapped onto the model's through its model family
    (:mod:`ggufvideo.lora.targets`). LoRA pairs, LyCORIS LoHa/LoKr, full diffs and DoRA all run
    unmerged (:func:`adapter_for`; a DoRA decodes each weight it targets once, to take its
    norms). Several LoRAs stack (apply each; remove in any order; one DoRA per layer, or
    several on disjoint rows of a fused weight).

    Args:
        model: the model.
        lora: a ``.safetensors``/``.pt`` file, a state dict, or a parsed :class:`LoraFile`.
        scale: the strength (multiplies each pair's ``alpha / rank``).
        strict: raise when a LoRA key matches no tensor of the model (else list it in
            ``handle.unmatched``).

    Raises:
        LoraError: unmatched keys (strict), an unreadable file, shapes that do not fit, a second
            DoRA on a layer's rows; the message names the LoRA file and the key.
    """
    lf = read_lora(lora)
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    res = resolve(lf, shapes)
    if strict:
        res.check_matched(lf.source, "the model", "; the model's names were tried as they are "
                          "and in every layout of its family (pass strict=False to apply the rest)")
    res.warn_skipped(lf.source)
    handle = LoraHandle(model, lf.source, scale, res)
    try:
        for key, pieces in res.weights.items():
            module_name, _, pname = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            shape = shapes[key]
            if pname == "weight" and isinstance(module, _ADAPTABLE) and len(shape) >= 2:
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups != 1:
                    raise LoraError(f"LoRA on grouped conv {_safe(key)} is not supported",
                                    path=lf.source, tensor=pieces[0].entry.keys[0])
                weight = state[key]
                adapters = [adapter_for(p, shape, lf.source, weight) for p in pieces]
                layer = _layer_for_adapters(module, key, lf.source)
                for p, a in zip(pieces, adapters):
                    if isinstance(a, DoraAdapter):
                        check_stackable(lora_adapters(layer), a, key, lf.source, magnitude_key(p))
                    base = a.scale
                    a.scale = handle.scale * base
                    lora_adapters(layer).append(a)
                    handle._adapters.append((layer, a, base))
            else:
                if any(p.entry.low_rank for p in pieces):
                    raise LoraError(f"a low-rank LoRA targets {_safe(key)} of "
                                    f"{type(module).__name__}; only Linear and Conv layers take "
                                    "adapters", path=lf.source, tensor=pieces[0].entry.keys[0])
                delta = dense_delta(pieces, shape, lf.source,
                                    weight=state[key] if needs_weight(pieces) else None)
                _check_unstreamed([(module, pname)], lf.source)
                _DenseDeltas.of(module).add(module, pname, handle.uid, delta, handle.scale)
                handle._dense.append((module, pname))
            handle.targets.append(key)
        for key, pieces in res.biases.items():
            module_name, _, pname = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            delta = dense_delta(pieces, shapes[key], lf.source, bias=True)
            _check_unstreamed([(module, pname)], lf.source)
            _DenseDeltas.of(module).add(module, pname, handle.uid, delta, handle.scale)
            handle._dense.append((module, pname))
            handle.targets.append(key)
    except BaseException:
        handle.remove()
        raise
    return handle


def fuse_lora(model: nn.Module, lora: LoraLike, scale: float = 1.0, *, strict: bool = True
              ) -> list[str]:
    """Merge a LoRA into the model's weights for good: each touched quantized weight is decoded,
    the delta added in float32, and requantized to its own type with the exact quantizer (what
    ``ggufvideo convert --lora`` writes to a file); plain weights get the delta rounded once.

    Irreversible (requantization loses what the original blocks held beyond the new blocks); use
    :func:`apply_lora` to run a LoRA unmerged and removable. A DoRA's norms are taken of the
    weights as they are now (with any LoRA fused before merged in). Returns the changed tensor
    names.
    """
    from .bake import merged_tensor

    lf = read_lora(lora)
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    res = resolve(lf, shapes)
    if strict:
        res.check_matched(lf.source, "the model")
    res.warn_skipped(lf.source)
    changed = []
    for table, bias in ((res.weights, False), (res.biases, True)):
        for key, pieces in table.items():
            module_name, _, pname = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            old = module._parameters[pname]
            assert old is not None
            delta = dense_delta(pieces, shapes[key], lf.source, bias=bias,
                                weight=old if needs_weight(pieces) else None) * scale
            new = merged_tensor(old, delta, name=key)
            module._parameters[pname] = nn.Parameter(new, requires_grad=False)
            changed.append(key)
    return changed
