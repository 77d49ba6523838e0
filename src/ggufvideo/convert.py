"""``convert``: a checkpoint (safetensors, sharded safetensors, .pt/.pth or GGUF) to a GGUF file.

The source is opened by its headers only (:mod:`ggufvideo.sources`): every tensor's name, shape and
dtype is known before any data is read, the policy types every tensor, the GGUF header is written,
then tensors are loaded, quantized and written one at a time (memory ~ one source tensor, never the
model). Output goes to a temporary file renamed at the end; the source is opened read-only and
never written.

Tied weights (two keys of a ``.pt`` or state dict sharing one storage) are written under each key
-- GGUF has no aliases -- but encoded once.

Keys are kept verbatim by default, so any architecture converts (a twin-backbone model like Ovi
included); a known model family (:mod:`ggufvideo.models`) can be written in another of its
layouts (``layout="original"``: the names the published GGUFs use). A diffusers ``config.json``
beside the source is recorded as ``ggufvideo.config`` metadata, for :func:`ggufvideo.from_gguf`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from gguf import GGMLQuantizationType, GGUFValueType

from .building import CONFIG_KEY, library_class

# Names marked F401 were imported here before the sources moved to :mod:`ggufvideo.sources`;
# they stay importable from this module.
from .errors import GGUFError, _safe  # noqa: F401
from .imatrix import Imatrix, load_imatrix
from .policy import QuantPolicy, source_qtype  # noqa: F401
from .quants import get_quant_type  # noqa: F401
from .reader import GGUFFile  # noqa: F401
from .shapes import COMFY_ORIG_SHAPE_PREFIX, RAW_SHAPE_SUFFIX, logical_shape  # noqa: F401
from .sources import SOURCE_METADATA_PREFIX, Source, open_source
from .sources.layout import relayout, source_config
from .tensor import GGMLTensor  # noqa: F401
from .writer import RawValue, SourceTensor, WriteSummary, tensor_tie, write_model  # noqa: F401

__all__ = ["convert", "open_source", "Source", "SOURCE_METADATA_PREFIX"]


# A precision or type tag at the end of a checkpoint's name ("wan-F32", "model_bf16", "x.Q4_K_M"):
# it describes the source file, not the converted one, so it is not carried into general.name.
# ("..._fp8_e4m3fn_scaled", "..._fp8_scaled": ComfyUI's scaled files, folded back on conversion)
_TYPE_TAG = re.compile(r"[-_. ](?:F32|F16|BF16|F64|FP32|FP16|FP8(?:_E4M3FN|_E5M2)?(?:_SCALED)?|"
                       r"I?Q[1-8](?:_[0-9A-Z]+)*|TQ[12]_0|MXFP4)$", re.IGNORECASE)


def _config_files(src: str) -> list[str]:
    """The config.json a conversion reads beside its source (:func:`source_config`): never
    written over, like the source itself."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, "config.json")
    return [path] if os.path.isfile(path) else []


def _model_name(value: Any) -> Any:
    """``general.name`` without a trailing type tag (``"model-F32"`` -> ``"model"``)."""
    raw = None
    if isinstance(value, RawValue):  # a requantized GGUF's own name, as stored
        if value.type != GGUFValueType.STRING or len(value.payload) < 8:
            return value
        n = int.from_bytes(value.payload[:8], "little")
        raw, value = value, value.payload[8:8 + n].decode("utf-8", "replace")
    if not isinstance(value, str):
        return value
    stripped = _TYPE_TAG.sub("", value)
    if not stripped or stripped == value:
        return raw if raw is not None else value
    return stripped


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            qtype: str | GGMLQuantizationType | None = "Q4_K", policy: QuantPolicy | None = None,
            overrides: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
            keep: Iterable[str] = (), force: bool = False, progress: bool = False,
            metadata: Mapping[str, Any] | None = None, architecture: str | None = None,
            device: torch.device | str | None = None,
            imatrix: str | os.PathLike[str] | Imatrix | None = None,
            imatrix_rename: Iterable[tuple[str, str]] | Mapping[str, str] = (),
            layout: str | None = None,
            loras: Sequence[tuple[Any, float]] = ()) -> WriteSummary:
    """Convert a checkpoint to GGUF.

    Args:
        src: a ``.safetensors`` file, a folder with ``*.safetensors.index.json`` (or just
            ``.safetensors`` shards), a ``.pt``/``.pth`` state dict, or a ``.gguf`` (requantized:
            tensors already of the decided type are copied unchanged).
        dst: the GGUF file to write.
        qtype: a ggml type (``"Q4_K"``, ``"Q8_0"``, ``"BF16"``...), a preset (``"Q4_K_M"``,
            ``"Q5_K_M"``...) or ``None`` (keep every tensor's precision).
        policy: a full :class:`QuantPolicy` instead of ``qtype``/``overrides``/``keep``.
        overrides: regex -> type (or ``"keep"``), first match wins.
        keep: extra regexes of tensors kept at high precision.
        force: replace an existing ``dst``.
        progress: show a tqdm progress bar (tensors and bytes).
        metadata: extra metadata for the file.
        architecture: ``general.architecture`` (default: the source's, else detected).
        device: where quantization runs (``"cuda"`` for speed; default CPU).
        imatrix: an importance matrix -- a file written by llama.cpp's ``imatrix`` tool (GGUF or
            legacy ``.dat``, see :mod:`ggufvideo.imatrix`) or a loaded :class:`Imatrix`. Each
            entry applies to the tensor of the same name when it is quantized to a type that uses
            one (K-quants, IQ4_NL/IQ4_XS, Q4_0/Q4_1/Q5_0/Q5_1); other tensors, and tensors without
            an entry, are quantized without. The file and its dataset are recorded in the output's
            ``quantize.imatrix.*`` metadata, as llama.cpp does.
        imatrix_rename: ``(regex, replacement)`` rules applied in order (``re.sub``) to the
            matrix's entry names before matching them to the source's tensor names, for a matrix
            computed on a differently named copy of the model: ``[("^", "model.diffusion_model.")]``
            adds a prefix, ``[(r"^model\\.diffusion_model\\.", "")]`` removes one.
        layout: write the tensor names of this layout of the source's model family:
            ``"original"`` (the release's names, as the published GGUFs and ComfyUI use) or
            ``"diffusers"``; ``None`` keeps the source's names. Tensors one layout fuses and the
            other splits (a fused QKV) are split or joined by rows -- quantized ones as raw blocks,
            written unchanged when their type stays.
        loras: ``(LoRA file or state dict, scale)`` pairs baked into the weights they touch
            (:mod:`ggufvideo.lora.bake`): each touched tensor is decoded, the deltas added in
            float32, and the sum requantized with the exact quantizer -- to the tensor's own type
            when ``qtype`` is ``None`` (keep), else to the policy's; untouched tensors follow the
            policy as usual (with ``qtype=None`` a GGUF source's are copied byte for byte). The
            LoRA names are mapped onto the source's (in either layout of its family) after
            ``layout`` renames it; a LoRA key matching no tensor is an error naming the file and
            key. ``summary.lora_changed`` lists the changed tensors.

    Returns:
        A :class:`~ggufvideo.writer.WriteSummary`; ``str()`` of it is the human summary.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        FileExistsError: ``dst`` exists and ``force`` is false.
        GGUFError: ``dst`` is the source, an unreadable source, or a tensor that cannot be
            written as asked (each message names the file and the tensor).
        ImatrixError: an unreadable importance matrix, or an entry whose length does not fit its
            tensor's rows (a :class:`GGUFError`; raised before anything is written).
    """
    if policy is None:
        policy = QuantPolicy.from_type(qtype, overrides=overrides, keep=keep)
    elif overrides or keep:
        raise ValueError("pass overrides/keep through the policy when giving one")
    dst = os.fspath(dst)
    srcp = os.fspath(src)
    if not os.path.exists(srcp):
        raise FileNotFoundError(f"{srcp}: no such file or folder")
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists (use --force / force=True to replace it)")
    imat = None
    if imatrix is not None:
        imat = imatrix if isinstance(imatrix, Imatrix) else load_imatrix(imatrix)
        if imatrix_rename:
            imat = imat.renamed(imatrix_rename)
    elif imatrix_rename:
        raise ValueError("imatrix_rename given without an imatrix")
    source = open_source(srcp)
    tensors = source.tensors
    notes: list[str] = []
    layout_meta: dict[str, Any] = {}
    if layout is not None:
        tensors, _, notes, layout_meta = relayout(tensors, layout, source.architecture, srcp,
                                                 source.metadata)
    lora_changed: dict[str, list[str]] = {}
    if loras:
        from .lora.bake import bake_sources

        tensors, policy, lora_changed = bake_sources(
            tensors, loras, policy, own_types=policy.qtype is None,
            architecture=source.architecture)
    meta: dict[str, Any] = {}
    config = source_config(srcp) if source.kind != "gguf" else None
    # the settings no shape tells (head count), for from_gguf: a diffusers/transformers config
    # only, not a release's own config.json (Wan-AI's "WanModel", whose keys mean other things)
    if config is not None and library_class(str(config.get("_class_name"))):
        meta[CONFIG_KEY] = json.dumps(config, sort_keys=True)
    if source.kind != "gguf":
        base = os.path.basename(os.path.normpath(srcp))
        meta["general.name"] = base.rsplit(".", 1)[0] if not os.path.isdir(srcp) else base
    meta.update(source.metadata)
    meta.update(layout_meta)  # (the target layout's own keys: llama.cpp's hyperparameters)
    if "general.name" in meta:
        meta["general.name"] = _model_name(meta["general.name"])
    if imat is not None:
        # A requantized GGUF may carry the keys of the matrix it was made with: replaced whole.
        for k in [k for k in meta if k.startswith("quantize.imatrix.")]:
            del meta[k]
        meta.update(imat.metadata())
    meta.update(metadata or {})
    try:
        summary = write_model(tensors, dst, policy=policy, metadata=meta,
                              architecture=architecture or source.architecture, requantize=True,
                              overwrite=force, progress=progress,
                              protect=[*source.files, *_config_files(srcp)],
                              device=device, imatrix=imat)
    finally:
        # Dropped, not closed: a mapping must outlive any tensor view still referenced (by a
        # traceback, say); the garbage collector releases it after the views.
        source._keep_open.clear()
    summary.lora_changed = lora_changed
    summary.notes.extend(source.notes)
    summary.notes.extend(notes)
    if imat is not None:
        names = {t.name for t in tensors}
        unmatched = [n for n in imat.entries if n not in names]
        if unmatched:
            summary.notes.append(
                f"{len(unmatched)} of {len(imat)} imatrix entries name no tensor of the source "
                f"(e.g. {_safe(unmatched[0])}); if the names differ by a prefix, map them with "
                "--imatrix-rename / imatrix_rename")
    return summary
