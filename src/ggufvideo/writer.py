"""Writing models as GGUF files: :func:`write_model` and :func:`save_state_dict`.

The policy decides each tensor's type from its name, shape and dtype alone, so the whole header --
sizes and offsets -- is known before any data is read; then tensors are loaded, encoded and written
one at a time. Peak memory is about one source tensor plus a bounded chunk of temporaries.

This module is the model pipeline (planning, encoding, tied weights, the summary). The GGUF byte
stream and the layout of stored tensors are :mod:`ggufvideo.serialize`'s (re-exported here); the
temporary file and its rename into place are :mod:`ggufvideo.publish`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, LlamaFileType

from .errors import GGUFError, QuantizationError
from .imatrix import USES_IMATRIX, Imatrix
from .policy import QuantPolicy, TensorDecision, source_qtype
from .quants import get_quant_type
from .serialize import (  # ALIGNMENT, encode_metadata: re-exported, importable here as before
    ALIGNMENT,  # noqa: F401
    GGUF_VERSION,
    MAX_GGML_NAME,
    RawValue,
    TensorEntry,
    TypedValue,
    _shape_metadata,
    encode_metadata,  # noqa: F401
    stored_layout,
    write_gguf,
)
from .shapes import COMFY_ORIG_SHAPE_PREFIX, RAW_SHAPE_SUFFIX  # noqa: F401  (importable here as before)
from .summary import WriteSummary, format_bytes  # noqa: F401  (importable here as before)
from .tensor import GGMLTensor

__all__ = [
    "save_state_dict",
    "write_gguf",
    "write_model",
    "TensorEntry",
    "SourceTensor",
    "TypedValue",
    "RawValue",
    "WriteSummary",
    "stored_layout",
    "detect_architecture",
    "GENERIC_ARCHITECTURE",
    "GGUF_VERSION",
    "format_bytes",
    "MAX_GGML_NAME",
    "tensor_tie",
]

#: ``general.architecture`` for models no known family matches.
GENERIC_ARCHITECTURE = "generic"
# Elements quantized per step: bounds the quantizer's temporaries (about 50 MB on CPU for 1M
# elements) whatever the tensor size. On a GPU, bigger steps amortise the per-op launch cost.
_CHUNK_ELEMENTS = 1 << 20
_GPU_CHUNK_ELEMENTS = 1 << 24


# -- architectures ---------------------------------------------------------------------------

def detect_architecture(names: Iterable[str]) -> str:
    """``general.architecture`` for a set of tensor names: a known family's or ``"generic"``.

    A model is recognised by its family's signature keys (:func:`ggufvideo.models.detect`), in any
    of its layouts, directly or under one container prefix (``model.diffusion_model.``...). The
    value is the one the published files of that family carry (ComfyUI-GGUF's loader refuses
    architectures it does not list; ``hyvid`` is HunyuanVideo). Anything else -- a twin-backbone
    model, a family whose files carry none, a new family -- is ``"generic"``: keys are written
    verbatim either way.
    """
    from .models import detect

    names = list(names)
    det = detect(names)
    if det is not None:
        return det.family.architectures[0] if det.family.architectures else GENERIC_ARCHITECTURE
    keys = set(names)
    for arch, alternatives in _OTHER_ARCHITECTURES:  # image models ComfyUI-GGUF also lists
        for prefix in ("", "model.diffusion_model."):
            if any(all(prefix + k in keys for k in alt) for alt in alternatives):
                return arch
    return GENERIC_ARCHITECTURE


# Families with no model-family module (image models), recognised only to label the file.
_OTHER_ARCHITECTURES: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("flux", (("double_blocks.0.img_attn.proj.weight",),
              ("transformer_blocks.0.attn.norm_added_k.weight",
               "single_transformer_blocks.0.proj_out.weight"))),
)


# -- the model pipeline ----------------------------------------------------------------------


@dataclass
class SourceTensor:
    """A tensor of a model being written, known by its header before its data is read.

    Attributes:
        name: tensor name.
        shape: logical shape.
        dtype: source dtype (for already-quantized tensors: their compute dtype).
        load: returns the tensor (plain or :class:`GGMLTensor`); called once, when written.
        qtype: the ggml type of an already-quantized source, else ``None``.
        nbytes: bytes the source holds (0 for a later name of tied data: stored once).
        tie: equal for names whose data is the same memory (tied weights, e.g. ``.pt``
            embeddings shared with a head): written under each name, encoded once. ``None``: not
            shared.
        release: called once the tensor's data has been consumed, to give its memory back (a
            memory-mapped source drops the pages it read); ``None``: nothing to do.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    qtype: GGMLQuantizationType | None = None
    nbytes: int = 0
    tie: Hashable | None = None
    release: Callable[[], None] | None = None


def _quantize_rows(x: torch.Tensor, qtype: GGMLQuantizationType,
                   imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """float32 rows ``(r, n)`` -> their ggml bytes ``(r, row_bytes)``."""
    from .quants import quantize

    return quantize(x, qtype, imatrix=imatrix)


def _encode_tensor(t: torch.Tensor, name: str, qtype: GGMLQuantizationType,
                   stored: tuple[int, ...], device: torch.device | None,
                   weights: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield the bytes of plain tensor ``t`` stored as ``qtype`` with stored shape ``stored``.

    ``weights``: importance weights ``(n_mat, row)``; one row serves every row of the tensor,
    ``n_mat`` rows serve consecutive equal groups of rows (the matrices of a 3-D tensor).
    """
    if t.numel() == 0:
        return
    qt = get_quant_type(qtype)
    rows = t.reshape(-1, stored[-1])
    where = device if device is not None else rows.device
    per_step = _CHUNK_ELEMENTS if where.type == "cpu" else _GPU_CHUNK_ELEMENTS
    step = max(1, per_step // rows.shape[1])
    n_mat = 1 if weights is None else weights.shape[0]
    per_mat = rows.shape[0] // n_mat
    # Steps never straddle two matrices: each is quantized with its own weights.
    starts = [(m, s) for m in range(n_mat)
              for s in range(m * per_mat, (m + 1) * per_mat, step)]
    if weights is not None:
        weights = weights.to(where)
    for m, start in starts:
        chunk = rows[start:min(start + step, (m + 1) * per_mat)]
        if qt.torch_dtype is not None:
            # Plain types: the values themselves, rounded once from the source (what ggml's
            # fp32 -> fp16/bf16 converters do); the same dtype is copied bit for bit.
            yield chunk.to(qt.torch_dtype).contiguous().view(torch.uint8)
            continue
        x = chunk.to(device=where, dtype=torch.float32)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise QuantizationError(
                f"{bad} non-finite value(s) (NaN/inf): quantizing to {qtype.name} would corrupt "
                "their blocks; keep the tensor at high precision (an override to 'keep')",
                tensor=name)
        if weights is None:
            yield _quantize_rows(x, qtype).cpu()
        else:
            yield _quantize_rows(x, qtype, weights[m]).cpu()


def _plan(src: SourceTensor, policy: QuantPolicy, requantize: bool
          ) -> tuple[TensorDecision, bool]:
    """(decision, copy_raw): copy_raw = write the quantized source's bytes unchanged."""
    if src.qtype is not None:
        d = policy.decide(src.name, src.shape, torch.float32)
        if not requantize or d.keep or d.qtype == src.qtype:
            reason = "already quantized, written as is" if not requantize else (
                d.reason if d.qtype == src.qtype else f"{d.reason}; already quantized, kept as is")
            return TensorDecision(src.qtype, src.qtype, reason, keep=d.keep), True
        return d, False
    return policy.decide(src.name, src.shape, src.dtype), False


@dataclass
class _SharedBytes:
    """The encoded bytes of data written under several names (tied weights).

    The first name encodes and keeps its chunks; each later name writes them again; the last one
    drops them. Held at most from the first name to the last: about one encoded tensor.
    """

    users_left: int
    chunks: list[torch.Tensor] | None = None


def _produce(src: SourceTensor, decision: TensorDecision, copy_raw: bool,
             stored: tuple[int, ...], device: torch.device | None, on_done: Callable[[int], None],
             weights: torch.Tensor | None = None, shared: _SharedBytes | None = None
             ) -> Callable[[], Iterator[torch.Tensor]]:
    def gen() -> Iterator[torch.Tensor]:
        if shared is not None and shared.chunks is not None:
            yield from shared.chunks
            shared.users_left -= 1
            if shared.users_left == 0:
                shared.chunks = None
            on_done(src.nbytes)
            return
        t = src.load()
        if tuple(t.shape) != tuple(src.shape):
            raise GGUFError(f"source shape changed: header said {list(src.shape)}, data is "
                            f"{list(t.shape)}", tensor=src.name)
        if copy_raw:
            assert isinstance(t, GGMLTensor)
            parts: Iterable[torch.Tensor] = [t.raw.reshape(-1)]
        else:
            if isinstance(t, GGMLTensor):
                t = t.dequantize(torch.float32)
            parts = _encode_tensor(t, src.name, decision.qtype, stored, device, weights)
        kept: list[torch.Tensor] | None = [] if shared is not None else None
        for part in parts:
            if kept is not None:
                # A copy: a part may be a view of the source's memory, released below.
                kept.append(part.detach().to("cpu", copy=True))
            yield part
        del t, parts
        if shared is not None:
            shared.chunks = kept
        if src.release is not None:
            src.release()
        on_done(src.nbytes)

    return gen


def write_model(sources: Iterable[SourceTensor], path: str | os.PathLike[str], *,
                policy: QuantPolicy, metadata: Mapping[str, Any] | None = None,
                architecture: str | None = None, requantize: bool = True,
                overwrite: bool = False, progress: bool = False,
                protect: Iterable[str | os.PathLike[str]] = (),
                device: torch.device | str | None = None,
                imatrix: Imatrix | None = None) -> WriteSummary:
    """Type every source tensor by ``policy`` and stream them into a GGUF file.

    The shared engine of :func:`save_state_dict` and :func:`ggufvideo.convert`.

    Args:
        sources: the tensors, in file order (headers only; data loaded one at a time).
        path: destination (temporary file + rename).
        policy: the quantization policy.
        metadata: extra metadata; written after the keys this function sets, which it may
            override (except shape keys and ``general.alignment``).
        architecture: ``general.architecture``; detected from the names when ``None``.
        requantize: quantized sources whose decided type differs are decoded and requantized
            (``False``: every quantized source is written as it is).
        overwrite: replace an existing destination.
        progress: show a tqdm bar (tensors and bytes).
        protect: files never to be replaced (sources).
        device: where quantization runs (``None``: CPU).
        imatrix: importance weights by tensor name, used for the tensors quantized to a type that
            takes them (:data:`ggufvideo.imatrix.USES_IMATRIX`); others ignore it.

    Raises:
        ImatrixError: an importance-matrix entry whose length does not fit its tensor's rows
            (raised before anything is written).
    """
    t0 = time.perf_counter()
    path = os.fspath(path)
    sources = list(sources)
    dev = torch.device(device) if device is not None else None
    arch = architecture or detect_architecture(s.name for s in sources)

    bar: Any = None  # made once the plan stands, so an error in planning leaves no open bar
    done = [0]

    def on_done(nbytes: int) -> None:
        done[0] += 1
        if bar is not None:
            bar.update(nbytes)
            bar.set_postfix_str(f"{done[0]}/{len(sources)} tensors", refresh=False)

    decisions: dict[str, TensorDecision] = {}
    entries: list[TensorEntry] = []
    shape_meta: dict[str, Any] = {}
    imatrix_used: list[str] = []
    plans = []
    for s in sources:
        decision, copy_raw = _plan(s, policy, requantize)
        stored, needs_meta = stored_layout(s.shape, decision.qtype)
        if needs_meta:
            shape_meta.update(_shape_metadata(s.name, tuple(s.shape)))
        decisions[s.name] = decision
        weights = None
        if imatrix is not None and not copy_raw and decision.qtype in USES_IMATRIX:
            weights = imatrix.weights_for(s.name, stored)
            if weights is not None:
                imatrix_used.append(s.name)
        plans.append((s, decision, copy_raw, stored, weights))
    shared, tied = _tied_groups(plans)
    for s, decision, copy_raw, stored, weights in plans:
        entries.append(TensorEntry(s.name, decision.qtype, stored,
                                   _produce(s, decision, copy_raw, stored, dev, on_done, weights,
                                            shared.get(s.name))))

    meta: dict[str, Any] = {"general.architecture": arch}
    from . import __version__

    meta["general.quantized_by"] = f"ggufvideo {__version__}"
    meta["general.quantization_version"] = TypedValue(GGUFValueType.UINT32, GGML_QUANT_VERSION)
    ftype = _file_type(policy, decisions)
    if ftype is not None:
        meta["general.file_type"] = TypedValue(GGUFValueType.UINT32, int(ftype))
    for k, v in (metadata or {}).items():
        if k in shape_meta or k == "general.alignment":
            raise GGUFError(f"metadata key {k!r} is written by the writer itself", path=path)
        meta[k] = v
    meta.update(shape_meta)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.nbytes for s in sources), unit="B", unit_scale=True,
                   unit_divisor=1024, desc="converting", dynamic_ncols=True)
    try:
        size = write_gguf(path, entries, meta, overwrite=overwrite, protect=protect)
    finally:
        if bar is not None:
            bar.close()
    bytes_in = sum(s.nbytes for s in sources)
    return WriteSummary(path, arch, bytes_in, size, decisions, time.perf_counter() - t0,
                        imatrix=imatrix.path if imatrix is not None else None,
                        imatrix_used=imatrix_used,
                        imatrix_entries=len(imatrix) if imatrix is not None else 0, tied=tied)


def _tied_groups(plans: list[tuple[SourceTensor, TensorDecision, bool, tuple[int, ...],
                                   torch.Tensor | None]]
                 ) -> tuple[dict[str, _SharedBytes], dict[str, str]]:
    """Names whose bytes can be encoded once: same data (``tie``), same type, stored shape and
    importance weights. Returns name -> its group's shared bytes, and later name -> first name."""
    groups: dict[Hashable, list[str]] = {}
    for s, decision, copy_raw, stored, weights in plans:
        if s.tie is None:
            continue
        wkey = None if weights is None else weights.numpy().tobytes()
        groups.setdefault((s.tie, decision.qtype, stored, copy_raw, wkey), []).append(s.name)
    shared: dict[str, _SharedBytes] = {}
    tied: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        bucket = _SharedBytes(users_left=len(names) - 1)
        for n in names:
            shared[n] = bucket
        tied.update({n: names[0] for n in names[1:]})
    return shared, tied


def _file_type(policy: QuantPolicy, decisions: Mapping[str, TensorDecision]
               ) -> LlamaFileType | None:
    """``general.file_type``: the preset/type asked for, else the type holding most tensors."""
    name = policy.name
    if not name:
        counts: dict[str, int] = {}
        for d in decisions.values():
            counts[d.qtype.name] = counts.get(d.qtype.name, 0) + 1
        if not counts:
            return None
        name = max(counts, key=lambda k: counts[k])
    if name == "F32":
        return LlamaFileType.ALL_F32
    for candidate in (f"MOSTLY_{name}", f"MOSTLY_{name}_S"):
        if candidate in LlamaFileType.__members__:
            return LlamaFileType[candidate]
    return None


# -- state dicts -----------------------------------------------------------------------------


def tensor_tie(t: torch.Tensor) -> Hashable | None:
    """A key equal for tensors that are the same data in memory (tied weights: one storage, same
    offset, shape, strides and dtype), ``None`` for data that cannot be shared (empty, meta)."""
    if t.numel() == 0 or t.is_meta or isinstance(t, GGMLTensor):
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None
    return (str(t.device), ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _state_dict_sources(state_dict: Mapping[str, torch.Tensor]) -> list[SourceTensor]:
    out = []
    seen_ties: set[Hashable] = set()
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise GGUFError(f"state dict keys must be strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise GGUFError(f"expected a tensor, found {type(t).__name__}", tensor=name)
        if t.is_meta:
            raise GGUFError("tensor is on the meta device (no data to write)", tensor=name)
        if isinstance(t, GGMLTensor):
            out.append(SourceTensor(name, tuple(t.shape), t.dtype, (lambda t=t: t), t.qtype,  # type: ignore[misc]
                                    t.raw.nbytes))
        else:
            source_qtype(t.dtype)  # raises for dtypes GGUF cannot hold
            tie = tensor_tie(t)
            nbytes = 0 if tie in seen_ties else t.numel() * t.element_size()
            if tie is not None:
                seen_ties.add(tie)
            out.append(SourceTensor(name, tuple(t.shape), t.dtype, (lambda t=t: t), None,  # type: ignore[misc]
                                    nbytes, tie))
    return out


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                    qtype: str | GGMLQuantizationType | None = None,
                    policy: QuantPolicy | None = None, metadata: Mapping[str, Any] | None = None,
                    overwrite: bool = False, progress: bool = False,
                    device: torch.device | str | None = None) -> WriteSummary:
    """Write a state dict as a GGUF v3 file.

    Args:
        state_dict: name -> tensor. :class:`GGMLTensor` values are written as they are (their raw
            blocks, byte for byte); plain tensors are typed by the policy.
        path: destination (written to a temporary file and renamed: never left partial).
        qtype: a ggml type or preset (``"Q4_K"``, ``"Q4_K_M"``, ``"Q8_0"``, ``"BF16"``...);
            ``None`` keeps every plain tensor at its own precision (a lossless save).
        policy: a full :class:`QuantPolicy` (overrides, keep patterns); excludes ``qtype``.
        metadata: extra metadata (``general.architecture`` is detected when absent).
        overwrite: replace an existing file; by default an existing file is never replaced
            (:class:`FileExistsError`), as with :func:`ggufvideo.convert` (``force=``).
        progress: show a progress bar.
        device: where quantization runs (``None``: where each tensor is).

    Returns:
        A :class:`WriteSummary` (sizes, per-tensor decisions, fallbacks).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        GGUFError: a value that is not a tensor, a dtype GGUF cannot store, non-finite values in a
            tensor to be quantized, or bad metadata.
    """
    if policy is not None and qtype is not None:
        raise ValueError("pass either qtype or policy, not both")
    pol = policy if policy is not None else QuantPolicy.from_type(qtype)
    meta = dict(metadata or {})
    arch = meta.pop("general.architecture", None)
    return write_model(_state_dict_sources(state_dict), path, policy=pol, metadata=meta,
                       architecture=arch, requantize=False, overwrite=overwrite,
                       progress=progress, device=device)
