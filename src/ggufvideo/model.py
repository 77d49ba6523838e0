"""``load_model``: put a GGUF file's weights into any PyTorch model, kept quantized.

The usual recipe for a model too large to build in full precision::

    with ggufvideo.empty_weights():          # parameters on meta, buffers real
        model = WanTransformer3DModel(**config)
    ggufvideo.load_model(model, "wan2.1-t2v-14b-Q4_K_M.gguf", device="cuda")

No full-precision copy of a weight is ever allocated: parameters start on the meta device, quantized
tensors become :class:`~ggufvideo.GGMLTensor` parameters (raw blocks, memory-mapped on CPU) and the
layers (see :mod:`ggufvideo.ops`) decode them one at a time in ``forward``.

Models built entirely under ``torch.device("meta")`` also have their *buffers* on meta, and a
non-persistent buffer (diffusers' Wan rotary tables ``rope.freqs_cos``/``freqs_sin``) is in no file:
its values come from the module's ``__init__``. ``load_model`` recovers them when the model can
rebuild itself from its config (diffusers' ``from_config``): a skeleton is built under
:func:`empty_weights` (so it costs only its buffers) and its buffers are copied over. Otherwise it
raises an error naming the buffers, asking for the model to be built with :func:`empty_weights`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from .errors import ModelLoadError, _safe
from .loader import (
    DTypeLike,
    file_architecture,
    paused_gc,
    read_tensors,
    resolve_device,
    resolve_dtype,
)
from .models import CONTAINER_PREFIXES, strip_prefix
from .models.matching import LayoutMatch, describe_keys, match_layout
from .ops import QuantLayer, dequantize_weight, swap_quant_layers
from .reader import GGUFFile
from .tensor import GGMLTensor

__all__ = [
    "load_model",
    "assign_state_dict",
    "empty_weights",
    "IncompatibleKeys",
    "ModelLoadError",
    "parameter_bytes",
    "strip_prefix",
]

#: Prefixes real checkpoints put before a model's own keys, tried first by the automatic strip.
KNOWN_PREFIXES = CONTAINER_PREFIXES

#: Below this share of the model's keys found in the file, even ``strict=False`` refuses to load:
#: the rest would stay on the meta device and fail far from the cause.
MIN_MATCHED = 0.5

_log = logging.getLogger("ggufvideo")


class IncompatibleKeys(NamedTuple):
    """What :func:`assign_state_dict` could not match, like ``nn.Module.load_state_dict``'s result.

    Attributes:
        missing_keys: model keys (parameters and persistent buffers) the file does not contain.
        unexpected_keys: file keys (after prefix stripping and renaming) the model does not have.
        meta_buffers: buffers still on the meta device after loading (their values are unknown).
        layout: how the file's names were fitted to the model's (prefix removed, the family's
            layout mapping used, if any).
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    meta_buffers: list[str]
    layout: LayoutMatch | None = None


# -- building without weights --------------------------------------------------------------------
@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build models with parameters on the meta device and buffers real.

    Inside the block, every parameter a module registers is moved to ``meta`` right away (its
    initialisation then runs on meta, at no cost); buffers are computed as usual, so non-persistent
    ones such as rotary tables hold their real values. The same idea as accelerate's
    ``init_empty_weights()``. Note that it patches ``nn.Module.register_parameter`` for the duration
    of the block, process-wide.
    """
    original = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            assert p is not None
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


# -- keys ----------------------------------------------------------------------------------------
def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(_safe(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# -- assigning -----------------------------------------------------------------------------------
#: plain dtypes that GGMLTensor can hold as stored (the GGUF types of the same name)
_STORED_TYPE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _convert(t: torch.Tensor, like: torch.Tensor, *, lazy: bool, dtype: torch.dtype | None,
             device: torch.device | None, keep_dtype: bool = False) -> torch.Tensor:
    """A file tensor made ready to replace ``like`` (the model's current parameter/buffer).

    ``keep_dtype``: a plain float tensor of another dtype than the target keeps its stored bytes,
    as a :class:`GGMLTensor` of its plain type (for the weights of quant-aware layers, which decode
    in ``forward`` anyway).
    """
    if device is None:
        device = like.device if like.device.type != "meta" else torch.device("cpu")
    if isinstance(t, GGMLTensor):
        target = dtype or (like.dtype if like.is_floating_point() else t.dtype)
        if lazy:
            if t.dtype != target:  # compute dtype only, the raw blocks shared (no dispatch)
                t = GGMLTensor(t.raw, t.qtype, t.shape, target)
            return t if t.device == device else t.to(device)
        # Eager: decode on the target device, straight to the target dtype (one rounding).
        return dequantize_weight(t.to(device), target)
    if t.is_floating_point():
        target = dtype or (like.dtype if like.is_floating_point() else t.dtype)
        stored = _STORED_TYPE.get(t.dtype)
        if keep_dtype and lazy and t.dtype != target and stored is not None and t.dim() > 0:
            # Keep the stored bytes and decode in forward like any quantized weight: an F16 file
            # stays 16-bit in memory while the parameter reports the model's dtype (model code
            # such as diffusers' reads parameter dtypes to pick its own compute dtype).
            raw = t.to(device).contiguous().view(torch.uint8)
            return GGMLTensor(raw, stored, t.shape, target)
    else:
        target = like.dtype if not like.is_floating_point() else t.dtype
    out = t.to(device=device, dtype=target)
    if not lazy and out.data_ptr() == t.data_ptr():
        out = out.clone()  # eager tensors own their memory instead of pinning the file's mapping
    return out


def _entries(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """state_dict key -> (owning module, attribute name, is_parameter), in state_dict order."""
    out: dict[str, tuple[nn.Module, str, bool]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        base = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out[base + name] = (mod, name, True)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[base + name] = (mod, name, False)
    return out


def _tie_groups(entries: Mapping[str, tuple[nn.Module, str, bool]]) -> list[list[str]]:
    """Keys naming one and the same parameter (tied weights: T5's ``shared`` and
    ``encoder.embed_tokens``), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for key, (mod, name, is_param) in entries.items():
        if is_param:
            groups.setdefault(id(mod._parameters[name]), []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def _fill_tied(sd: Mapping[str, torch.Tensor], groups: list[list[str]]) -> dict[str, torch.Tensor]:
    """``sd`` with each tied key it lacks taken from a key of its group it has (a checkpoint that
    stores a tied weight once)."""
    out = dict(sd)
    for group in groups:
        present = next((k for k in group if k in sd), None)
        if present is not None:
            for k in group:
                out.setdefault(k, sd[present])
    return out


def _meta_buffers(model: nn.Module) -> list[str]:
    return [n for n, b in model.named_buffers(remove_duplicate=False) if b.device.type == "meta"]


def _recover_meta_buffers(model: nn.Module) -> None:
    """Fill meta buffers from a skeleton the model builds from its own config, when it can."""
    from_config = getattr(type(model), "from_config", None)
    config = getattr(model, "config", None)
    if from_config is None or config is None or not _meta_buffers(model):
        return
    try:
        with empty_weights():
            skeleton = from_config(config)
    except Exception:  # a config that cannot rebuild the model: the caller reports the buffers
        return
    fresh = dict(skeleton.named_buffers(remove_duplicate=False))
    for name in _meta_buffers(model):
        src = fresh.get(name)
        if src is None or src.device.type == "meta":
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        old = mod._buffers[attr]
        assert old is not None
        if src.shape == old.shape:
            mod._buffers[attr] = src.to(old.dtype)


def assign_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                      strict: bool = True, prefix: str | None = None, lazy: bool = True,
                      dtype: DTypeLike = None, device: torch.device | str | None = None,
                      path: str | os.PathLike[str] | None = None,
                      architecture: str | None = None,
                      metadata: Mapping[str, Any] | None = None,
                      source: GGUFFile | None = None) -> IncompatibleKeys:
    """Make ``state_dict``'s tensors the model's parameters and persistent buffers.

    Tensors are *assigned* (not copied into existing storage), so the model may be on the meta
    device, and quantized tensors stay :class:`GGMLTensor`. This is the step of :func:`load_model`
    after reading the file; see it for the arguments. ``path`` only names the file in errors;
    ``architecture`` (the file's ``general.architecture``) helps tell its model family;
    ``metadata`` (the file's) is what some renamings read (llama.cpp's q/k row order: the heads).
    ``source``: the open file ``state_dict`` was read from; with a CUDA ``device`` and ``lazy``
    its tensors are copied to the GPU in one pass through pinned staging
    (:mod:`ggufvideo.runtime._upload`) instead of one pageable ``.to()`` each.

    Returns:
        the keys that did not match (after the strict check) and how names were fitted.

    Raises:
        ModelLoadError: a shape differs (naming the key); ``strict`` and keys are missing,
            unexpected, or buffers are left on the meta device; or (even with ``strict=False``)
            fewer than half of the model's keys are in the file, naming the file's and the
            model's best-matching family and layout.
    """
    want = resolve_dtype(dtype, device)
    dev = resolve_device(device) if device is not None else None
    entries = _entries(model)
    model_shapes = {k: tuple((m._parameters if p else m._buffers)[n].shape)  # type: ignore[union-attr]
                    for k, (m, n, p) in entries.items()}
    sd, fit = match_layout(state_dict, model_shapes, prefix=prefix, architecture=architecture,
                           context=metadata)
    prefix = fit.prefix
    ties = _tie_groups(entries)
    sd = _fill_tied(sd, ties)
    if fit.renamed:
        _log.info("load_model(%s): %s", _safe(os.fspath(path)) if path else "state dict", fit)
    if fit.family is not None and fit.family.unused:
        # parts a file of this family may hold beside the model (a T5 file's decoder, an LM head)
        sd = {k: v for k, v in sd.items() if k in entries or not fit.family.is_unused(k)}
    unexpected = [k for k in sd if k not in entries]
    found = sum(k in sd for k in entries)
    if entries and found < MIN_MATCHED * len(entries):
        raise ModelLoadError(
            f"the file does not fit this model: only {found} of the model's {len(entries)} keys "
            f"are in it ({len(unexpected)} file keys unexpected). The file looks like "
            f"{describe_keys(state_dict, architecture)}; the model like "
            f"{describe_keys(entries)} (its class: {type(model).__name__}). Missing keys: "
            f"{_format_keys([k for k in entries if k not in sd], 5)}; unexpected keys: "
            f"{_format_keys(unexpected, 5)}", path=path)

    # Check every shape before changing anything: a bad file must not leave a half-loaded model.
    for key, (mod, name, is_param) in entries.items():
        t = sd.get(key)
        if t is None:
            continue
        old = (mod._parameters if is_param else mod._buffers)[name]
        assert old is not None
        if old.dim() == 0 and tuple(t.shape) == (1,) and not isinstance(t, GGMLTensor):
            # GGUF has no 0-d tensors: writers store a scalar parameter (LTX-Video's
            # timestep_scale_multiplier) as one element
            sd[key] = t = t.reshape(())
        if tuple(t.shape) != tuple(old.shape):
            raise ModelLoadError(f"shape mismatch: the model expects {list(old.shape)}, the file "
                                 f"has {list(t.shape)}", path=path, tensor=prefix + key)

    if dev is not None and lazy and source is not None:
        from .runtime._upload import upload_state, use_fast_upload

        if use_fast_upload(dev):
            sd = upload_state(sd, [k for k in entries if k in sd], dev, source)

    missing = []
    assigned: dict[int, nn.Parameter] = {}  # tied parameters stay one object
    for key, (mod, name, is_param) in entries.items():
        t = sd.get(key)
        if t is None:
            missing.append(key)
            continue
        old = (mod._parameters if is_param else mod._buffers)[name]
        assert old is not None
        if is_param and id(old) in assigned:
            mod._parameters[name] = assigned[id(old)]
            continue
        new = _convert(t, old, lazy=lazy, dtype=want, device=dev,
                       keep_dtype=is_param and isinstance(mod, QuantLayer))
        if is_param:
            trainable = (old.requires_grad and new.is_floating_point()
                         and not isinstance(new, GGMLTensor))
            if isinstance(new, GGMLTensor) and new is not t:
                # made for this parameter by _convert: marked as one, not wrapped again
                new._is_param = True
                param = cast(nn.Parameter, new)
            elif isinstance(new, GGMLTensor):
                # the state dict's own tensor: GGMLTensor's parameter constructor shares its raw
                # blocks and marks the parameter, as nn.Parameter does, without a detach through
                # __torch_dispatch__ (a few us each, ~1,100 times in a 14B model)
                param = cast(nn.Parameter, GGMLTensor(new, requires_grad=False))
            else:
                param = nn.Parameter(new, requires_grad=trainable)
            if any(key in g for g in ties):
                assigned[id(old)] = param
            mod._parameters[name] = param
        else:
            mod._buffers[name] = new.dequantize() if isinstance(new, GGMLTensor) else new

    if dev is not None:  # what the file did not provide follows the model to the device
        for mod in model.modules():
            for name, b in mod._buffers.items():
                if b is not None and b.device.type != "meta" and b.device != dev:
                    mod._buffers[name] = b.to(dev)
            for name, p in mod._parameters.items():
                if p is not None and p.device.type != "meta" and p.device != dev:
                    mod._parameters[name] = nn.Parameter(p.to(dev), requires_grad=p.requires_grad)
    _recover_meta_buffers(model)
    meta = _meta_buffers(model)
    report = IncompatibleKeys(missing, unexpected, meta, fit)
    if strict and (missing or unexpected or meta):
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not in the file): {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the file, not in the model): "
                         f"{_format_keys(unexpected)}")
        if prefix or fit.renamed:
            parts.append(f"(file names fitted: {fit})")
        if meta:
            parts.append(f"buffers left on the meta device (no file holds them; they are computed "
                         f"by the module's __init__): {_format_keys(meta)}; build the model under "
                         "ggufvideo.empty_weights() (parameters on meta, buffers real) instead of "
                         "torch.device('meta')")
        raise ModelLoadError("; ".join(parts), path=path)
    return report


def load_model(model: nn.Module, path: str | os.PathLike[str], *, lazy: bool = True,
               dtype: DTypeLike = None, device: torch.device | str | None = None,
               strict: bool = True, prefix: str | None = None,
               vram_budget: int | str | None = None) -> nn.Module:
    """Load a GGUF file's weights into ``model``, in place.

    Args:
        model: any ``nn.Module``; on the meta device or not (see :func:`empty_weights`).
        path: the .gguf file.
        lazy: ``True`` makes the supported layers quant-aware
            (:func:`ggufvideo.ops.swap_quant_layers`) and keeps quantized weights as
            :class:`GGMLTensor` (raw blocks; on CPU, zero-copy views of the memory-mapped file),
            decoded layer by layer in ``forward``. ``False`` leaves the layers as they are and
            gives them plain tensors holding the decoded weights (decoded one tensor at a time,
            on ``device``).
        dtype: ``None``: each tensor takes the dtype of the parameter it replaces (the compute dtype
            for quantized ones). In lazy mode the unquantized weights of quant-aware layers keep
            their stored bytes (an F16 file stays 16-bit in memory, as an F16 ``GGMLTensor`` whose
            ``.dtype`` is the model's). A dtype or name (``"bfloat16"``, ``"auto"``, ...): every
            floating tensor from the file takes it. Buffers the file does not hold are left as
            they are.
            In lazy mode the layers compute in their *input's* dtype unless a compute dtype is set
            (:func:`ggufvideo.ops.set_compute_dtype`).
        device: where the weights go; raw blocks are moved, not decoded. ``None``: where the
            model's parameter is, or CPU for parameters on meta. To a CUDA device (``lazy``)
            the file's tensors are copied in one pass through pinned staging buffers filled
            from the file by reader threads while the previous chunk's copy runs
            (:mod:`ggufvideo.runtime._upload`; ``GGUFVIDEO_UPLOAD=register`` page-locks the
            mapping in place instead, ``=plain`` copies each tensor with ``.to()``).
        strict: raise :class:`ModelLoadError` naming every missing and unexpected key (and every
            buffer left on meta). With ``False`` they are reported by a warning.
        prefix: removed from the file's keys that start with it (``"model.diffusion_model."``).
            ``None`` picks the prefix that matches the most keys, if one matches more than no
            prefix does; ``""`` disables stripping.
        vram_budget: with a GPU ``device``, the bytes of weights allowed on it (``"8GiB"``): the
            weights are loaded on the host and :func:`ggufvideo.offload` streams what does not
            fit (``model._ggufvideo_offload`` is its handle).

    Names: when the file is a known model family (:mod:`ggufvideo.models`) in another layout than
    the model's -- a Wan file with the original release's names loaded into diffusers'
    ``WanTransformer3DModel``, or the reverse -- its tensors are renamed (fused tensors split, or
    split ones joined, by rows of raw blocks: exact) to the layout that matches the most of the
    model's keys. The mapping used is logged on the ``ggufvideo`` logger and returned by
    :func:`assign_state_dict` (``IncompatibleKeys.layout``). Even with ``strict=False`` a file
    holding fewer than half of the model's keys is refused, naming the families both look like.

    Returns:
        ``model``, its weights loaded.

    Raises:
        FileNotFoundError: no such file.
        GGUFError: the file is malformed; :class:`ModelLoadError` if it does not fit the model.
    """
    if vram_budget is not None:  # load on the host, then stream (ggufvideo.runtime)
        from .runtime import offload

        load_model(model, path, lazy=lazy, dtype=dtype, device="cpu", strict=strict, prefix=prefix)
        model._ggufvideo_offload = offload(model, device or "cuda", budget=vram_budget)  # type: ignore[assignment]
        return model
    with paused_gc():
        file = GGUFFile(path)
        sd = read_tensors(file, lazy=True)  # zero-copy views; decoded (eager) one at a time
        if lazy:
            swap_quant_layers(model)
        report = assign_state_dict(model, sd, strict=strict, prefix=prefix, lazy=lazy,
                                   dtype=dtype, device=device, path=path,
                                   architecture=file_architecture(file), metadata=file.metadata,
                                   source=file)
    if not strict and (report.missing_keys or report.unexpected_keys or report.meta_buffers):
        warnings.warn(f"load_model({_safe(os.fspath(path))}): {len(report.missing_keys)} "
                      f"missing keys [{_format_keys(report.missing_keys, 10)}], "
                      f"{len(report.unexpected_keys)} "
                      f"unexpected keys [{_format_keys(report.unexpected_keys, 10)}], "
                      f"{len(report.meta_buffers)} buffers on meta "
                      f"[{_format_keys(report.meta_buffers, 10)}]", stacklevel=2)
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers really hold (raw blocks for quantized ones)."""
    total = 0
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.raw.nbytes if isinstance(t, GGMLTensor) else t.nbytes
    return total

