"""Building ComfyUI objects (MODEL, VAE, CLIP) from GGUF files, weights kept quantized.

* Diffusion models go through ComfyUI's own loader, ``comfy.sd.load_diffusion_model_state_dict``:
  its model detection picks the architecture and config from the tensor names and shapes (which a
  :class:`~ggufvideo.GGMLTensor` reports in their logical form), and the model is built with
  :func:`operations` as its ``custom_operations``: ComfyUI's layer classes with the quant-aware
  mixins of :mod:`ggufvideo.comfy.layers` in front. Layers are built without weights and the
  quantized ones are assigned (never decoded) when ComfyUI loads the state dict.
* A VAE is built by ComfyUI's ``comfy.sd.VAE``, which creates its layers itself. It is given
  placeholders for the quantized tensors (full logical shape, one element of storage), and its
  layers that hold quantized weights are then switched to their quant-aware classes and given the
  raw blocks.

* A T5/UMT5 text encoder (llama.cpp's GGUFs) is renamed to ComfyUI's (transformers') names by the
  model-family layer and built by ``comfy.sd.load_text_encoder_state_dicts`` with
  :func:`operations`, like a diffusion model: the quantized token embedding included, nothing is
  decoded at load.

In every case the returned ``ModelPatcher`` is switched to the adapter's
(:mod:`ggufvideo.comfy.patcher`): LoRA on quantized layers, sizes counted in raw bytes.

ComfyUI is imported inside functions only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import GGUFError, ModelLoadError, _safe
from ..loader import load_state_dict, resolve_dtype
from ..models import detect
from ..models.tensors import TensorOps
from ..tensor import GGMLTensor
from ..tokenizer import unigram_vocab
from .layers import comfy_quant_class, quantize_module_classes, raw_state_bytes
from .patcher import make_quant_patcher

__all__ = [
    "ComfyLoadError",
    "PRECISIONS",
    "precision_dtype",
    "operations",
    "load_diffusion_model",
    "load_vae",
    "load_text_encoder",
    "TEXT_ENCODER_TYPES",
]

#: The text-encoder types the node offers: ComfyUI ``CLIPType`` names of the video models whose
#: text encoder is a T5/UMT5 (Wan: UMT5-XXL; LTX-Video, Mochi, Cosmos: T5-XXL).
TEXT_ENCODER_TYPES: tuple[str, ...] = ("wan", "ltxv", "mochi", "cosmos")

#: The precision choices the loader nodes offer.
PRECISIONS: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")

#: ComfyUI layer classes given quant-aware versions in :func:`operations`.
_LAYER_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                "ConvTranspose3d", "GroupNorm", "LayerNorm", "RMSNorm", "Embedding")


class ComfyLoadError(GGUFError):
    """A GGUF file could not be turned into a ComfyUI object (the message says which and why)."""


def precision_dtype(precision: str, device: torch.device | str | None = None) -> torch.dtype:
    """The dtype for a node's precision choice on ``device``.

    ``"auto"`` here means what it means everywhere in ggufvideo
    (:func:`ggufvideo.loader.resolve_dtype`): bfloat16 where ``device`` supports it, else float16.
    The model and VAE loaders do not call this for ``"auto"``: they leave the choice to ComfyUI
    (see :func:`chosen_dtype`).

    Raises:
        ComfyLoadError: not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ComfyLoadError(f"unknown precision {_safe(precision)!r}: expected one of "
                             f"{', '.join(PRECISIONS)}")
    dtype = resolve_dtype(precision, device)
    assert dtype is not None
    return dtype


def chosen_dtype(precision: str) -> torch.dtype | None:
    """The dtype a node's precision choice names, or ``None`` for ``"auto"``: ComfyUI's own choice.

    For a diffusion model or a VAE, ComfyUI picks the dtype from the model's supported dtypes,
    the compute device and its command-line options (``--bf16-unet``, ``--fp32-vae``, ...);
    ``"auto"`` leaves it that choice, so a GGUF model computes in the dtype ComfyUI would give the
    same model from its own checkpoint (float32 on a CPU, where ggufvideo's own "auto" would say
    bfloat16).

    Raises:
        ComfyLoadError: not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ComfyLoadError(f"unknown precision {_safe(precision)!r}: expected one of "
                             f"{', '.join(PRECISIONS)}")
    return None if precision == "auto" else precision_dtype(precision)


def _follow_model_dtype(model: torch.nn.Module, dtype: Any) -> None:
    """Give ``model``'s quantized parameters the compute dtype ComfyUI chose for it (what they
    report: the blocks are shared, nothing is decoded). A dtype they cannot decode to (an fp8
    storage dtype chosen by ``--fp8_e4m3fn-unet``) leaves them as they are."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if isinstance(p, GGMLTensor) and p.dtype != dtype:
                m._parameters[name] = torch.nn.Parameter(p.to(dtype), requires_grad=False)


def _compute_device() -> torch.device | None:
    """The device ComfyUI computes on (``None`` where ComfyUI cannot say)."""
    try:
        import comfy.model_management as mm

        return torch.device(mm.get_torch_device())
    except Exception:  # noqa: BLE001 - ComfyUI absent or without a device: resolve for the CPU
        return None


_OPERATIONS: type | None = None


def operations() -> type:
    """ComfyUI's ``disable_weight_init`` operations with every layer quant-aware (cached).

    Pass it as ``model_options["custom_operations"]`` to any of ComfyUI's model loaders.
    """
    global _OPERATIONS
    if _OPERATIONS is None:
        import comfy.ops

        base = comfy.ops.disable_weight_init
        layers: dict[str, Any] = {}
        for name in _LAYER_NAMES:
            cls = getattr(base, name, None)
            derived = comfy_quant_class(cls) if cls is not None else None
            if derived is not None:
                layers[name] = derived
        _OPERATIONS = type("GGUFVideoOps", (base,), {"__module__": __name__, **layers})
    return _OPERATIONS


def _read(path: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    try:
        # lazy: quantized tensors stay raw blocks (memory-mapped), plain ones are zero-copy views.
        sd = load_state_dict(path, lazy=True)
    except GGUFError as e:
        raise ComfyLoadError(f"{os.path.basename(path)}: {e}") from e
    if dtype is not None:
        # The compute dtype of quantized tensors (what they report and decode to by default).
        sd = {k: (v.to(dtype) if isinstance(v, GGMLTensor) else v) for k, v in sd.items()}
    return sd


def _to_original_layout(sd: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``sd`` renamed into its family's original layout (ComfyUI's names) when it is in another.

    ``ggufvideo convert`` keeps the source's names by default, so a file converted from a
    diffusers folder holds diffusers names, which ComfyUI's model detection does not know.
    Renaming moves raw blocks (row splits/joins), nothing is decoded.
    """
    det = detect(list(sd))
    if det is None or det.layout == "original" or "original" not in det.family.layouts:
        return sd
    inner, others = det.split(sd)
    try:
        return {**det.family.convert(inner, det.layout, "original", TensorOps()), **others}
    except GGUFError as e:
        raise ComfyLoadError(f"{os.path.basename(path)}: {e}") from e


def _describe(sd: Mapping[str, torch.Tensor], limit: int = 5) -> str:
    keys = list(sd)
    shown = ", ".join(_safe(k, 80) for k in keys[:limit])
    return f"{len(keys)} tensors ({shown}{', ...' if len(keys) > limit else ''})"


def load_diffusion_model(path: str, precision: str = "auto") -> Any:
    """A ComfyUI MODEL (``ModelPatcher``) for the diffusion model in a GGUF file.

    Args:
        path: the .gguf file (ComfyUI's key names, with or without ``model.diffusion_model.``).
        precision: one of :data:`PRECISIONS`; the model's compute dtype (``"auto"``: ComfyUI's
            own choice for the detected model, see :func:`chosen_dtype`).

    Raises:
        ComfyLoadError: unreadable file, or ComfyUI's model detection does not recognise it.
    """
    import comfy.sd

    dtype = chosen_dtype(precision)  # None: ComfyUI picks it below, as for its own checkpoints
    # read as stored: the quantized weights get their compute dtype once ComfyUI has settled it
    # (_follow_model_dtype below)
    sd = _read(path, None)
    if not sd:
        raise ComfyLoadError(f"{os.path.basename(path)}: the file holds no tensors")
    sd = _to_original_layout(sd, path)
    description = _describe(sd)
    options: dict[str, Any] = {"custom_operations": operations()}
    if dtype is not None:
        options["dtype"] = dtype
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    except RuntimeError as exc:  # ComfyUI's load_state_dict: tensors that do not fit its model
        raise _misfit(path, exc, "the model ComfyUI detected") from exc
    if patcher is None:
        raise ComfyLoadError(
            f"{os.path.basename(path)}: ComfyUI's model detection did not recognise a diffusion "
            f"model in {description}. The file must hold a diffusion model (not a VAE or text "
            "encoder) with the tensor names ComfyUI's own checkpoints use (for Wan: "
            "'blocks.0.self_attn.q.weight', 'patch_embedding.weight', 'head.head.weight'...); "
            "re-convert it with `ggufvideo convert SRC DST --layout original`.")
    # ComfyUI computes in its manual-cast dtype where it has one (bfloat16 asked for on a CPU:
    # float32), else in the model's dtype; the quantized weights report that.
    model = patcher.model
    _follow_model_dtype(model, getattr(model, "manual_cast_dtype", None) or model.get_dtype())
    return make_quant_patcher(patcher)


def _misfit(path: str, exc: RuntimeError, what: str) -> ComfyLoadError:
    first = next((ln.strip() for ln in str(exc).splitlines() if "shape" in ln), str(exc))
    return ComfyLoadError(f"{os.path.basename(path)}: its tensors do not fit {what}: "
                          f"{_safe(first, 300)}")


def _placeholder(t: GGMLTensor) -> torch.Tensor:
    # Full logical shape, one element of storage: enough for ComfyUI's config detection (which
    # reads shapes) and for its load_state_dict copy into the layers it allocated.
    return torch.zeros((), dtype=torch.float32).expand(t.shape)


def load_vae(path: str, precision: str = "auto") -> Any:
    """A ComfyUI VAE for a GGUF VAE (the Wan VAE, quantized Conv3d weights kept quantized).

    Args:
        path: the .gguf file (ComfyUI's VAE key names: ``encoder.conv1.weight``,
            ``decoder.middle.0.residual.0.gamma``...).
        precision: one of :data:`PRECISIONS` (``"auto"``: ComfyUI's own choice for its VAE, see
            :func:`chosen_dtype`).

    Raises:
        ComfyLoadError: unreadable file, not recognised as a VAE, or a quantized tensor that
            belongs to no layer that can decode it.
    """
    import comfy.sd

    dtype = chosen_dtype(precision)  # None: ComfyUI's VAE picks it (vae_dtype), as for its own
    sd = _read(path, dtype)
    quantized = {k: v for k, v in sd.items() if isinstance(v, GGMLTensor)}
    stand_in = {k: (_placeholder(v) if k in quantized else v) for k, v in sd.items()}
    vae = comfy.sd.VAE(sd=stand_in, dtype=dtype)
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ComfyLoadError(f"{os.path.basename(path)}: ComfyUI did not recognise a VAE in "
                             f"{_describe(sd)}")
    owners: dict[str, set[str]] = {}
    for key in quantized:
        module_name, _, param = key.rpartition(".")
        owners.setdefault(module_name, set()).add(param)
    modules = dict(model.named_modules())
    unplaced = [k for k in quantized if k.rpartition(".")[0] not in modules
                or comfy_quant_class(type(modules[k.rpartition(".")[0]])) is None
                or k.rpartition(".")[2] not in ("weight", "bias")]
    if unplaced:
        raise ComfyLoadError(
            f"{os.path.basename(path)}: quantized tensors that belong to no layer able to decode "
            f"them: {', '.join(_safe(k, 80) for k in unplaced[:5])}"
            f"{' ...' if len(unplaced) > 5 else ''} (store them unquantized)")
    quantize_module_classes(model, set(owners))
    for module_name, params in owners.items():
        m = modules[module_name]
        for p in params:
            current = m._parameters[p]
            # The compute dtype follows the VAE's (only what it reports; the blocks are shared).
            value = quantized[f"{module_name}.{p}"].to(vae.vae_dtype)
            if current is not None and value.device != current.device:
                value = value.to(current.device)
            m._parameters[p] = torch.nn.Parameter(value, requires_grad=False)
    make_quant_patcher(vae.patcher)
    vae.size = raw_state_bytes(model)
    return vae


def _text_encoder_state_dict(path: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under ComfyUI's T5 names (transformers'), renamed from llama.cpp's by the
    model-family layer (raw blocks kept; the decoder of an encoder-decoder file left out)."""
    from ..models import CANONICAL, detect
    from ..models.tensors import TensorOps

    det = detect(sd)
    if det is None or det.family.kind != "text-encoder":
        what = f"a {det.family.title}" if det is not None else _describe(sd)
        raise ComfyLoadError(f"{os.path.basename(path)}: expected a T5/UMT5 text encoder "
                             f"(llama.cpp's 'enc.blk.0.attn_q.weight' or transformers' "
                             f"'encoder.block.0.layer.0.SelfAttention.q.weight'), found {what}")
    inner = {k: v for k, v in det.split(sd)[0].items() if not det.family.is_unused(k)}
    return det.family.convert(inner, det.layout, CANONICAL, TensorOps())


def _spiece_model(path: str) -> torch.Tensor | None:
    """The serialized sentencepiece (unigram) model of the file's ``tokenizer.ggml.*`` vocabulary,
    as ComfyUI stores a UMT5 tokenizer (``spiece_model``, a uint8 tensor); None without one."""
    from ..reader import GGUFFile

    with GGUFFile(path) as f:
        md = dict(f.metadata)
    name = os.path.basename(path)
    if md.get("tokenizer.ggml.model") != "t5" or "tokenizer.ggml.tokens" not in md:
        return None
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # ComfyUI depends on sentencepiece; protobuf may be missing
        raise ComfyLoadError(f"{name}: rebuilding the tokenizer needs sentencepiece and "
                             f"protobuf ({e})") from e
    try:
        v = unigram_vocab(md, path)
    except ModelLoadError as e:
        raise ComfyLoadError(str(e)) from e
    proto = pb.ModelProto()
    for piece, score, kind in zip(v.tokens, v.scores, v.types):
        # llama.cpp's token types use sentencepiece's numbering (1 normal ... 6 byte)
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.vocab_size = len(v.tokens)
    spec.unk_id, spec.eos_id, spec.pad_id, spec.bos_id = v.unk, v.eos, v.pad, v.bos
    spec.byte_fallback = v.byte_fallback
    norm = proto.normalizer_spec
    norm.add_dummy_prefix = v.add_space_prefix
    norm.remove_extra_whitespaces = v.remove_extra_whitespaces
    norm.escape_whitespaces = True
    if v.charsmap:
        norm.name = "nmt_nfkc"
        norm.precompiled_charsmap = v.charsmap
    else:
        norm.name = "identity"
    return torch.frombuffer(bytearray(proto.SerializeToString()), dtype=torch.uint8)


def load_text_encoder(path: str, clip_type: str = "wan", precision: str = "auto") -> Any:
    """A ComfyUI CLIP for a GGUF T5/UMT5 text encoder, built by ComfyUI's own text-encoder code.

    The file's names are mapped to ComfyUI's (llama.cpp's ``enc.blk.N.attn_q`` ->
    ``encoder.block.N.layer.0.SelfAttention.q``); ComfyUI picks the model (T5-XXL, UMT5-XXL) and
    its tokenizer from the names, shapes and ``clip_type``, and builds it with :func:`operations`,
    so quantized weights -- the token embedding included -- stay quantized and are decoded layer by
    layer. The returned CLIP's patcher is the adapter's (LoRA on quantized layers).

    Args:
        path: the .gguf file (llama.cpp's ``t5encoder``/``t5`` names, or transformers').
        clip_type: one of :data:`TEXT_ENCODER_TYPES` (ComfyUI's ``CLIPType``, lower case).
        precision: one of :data:`PRECISIONS` (``"auto"``: bfloat16 where ComfyUI's compute device
            supports it, else float16, see :func:`precision_dtype`; ComfyUI's own choice would be
            float32 for a GGUF encoder, taken from its F32 norms).

    Raises:
        ComfyLoadError: unreadable file, not a T5/UMT5 encoder, an unknown type, or ComfyUI did
            not recognise the encoder.
    """
    import comfy.sd

    if clip_type not in TEXT_ENCODER_TYPES:
        raise ComfyLoadError(f"unknown text-encoder type {_safe(clip_type)!r}: expected one of "
                             f"{', '.join(TEXT_ENCODER_TYPES)}")
    dtype = precision_dtype(precision, _compute_device())
    sd = _text_encoder_state_dict(path, _read(path, dtype))
    if dtype is not None:
        # ComfyUI takes the encoder's dtype from encoder.final_layer_norm.weight (sd3_clip's
        # t5_xxl_detect), which llama.cpp's files keep F32: cast the plain tensors (norms,
        # relative-attention biases) too, or the chosen precision is ignored (always float32).
        sd = {k: (v.to(dtype) if not isinstance(v, GGMLTensor) and v.is_floating_point() else v)
              for k, v in sd.items()}
    if clip_type == "wan":
        # ComfyUI's UMT5 tokenizer is the sentencepiece model stored with the weights
        # ("spiece_model"); without it the CLIP cannot be built. A GGUF file carries the
        # vocabulary as tokenizer.ggml.* metadata instead: rebuild the model from it.
        spiece = _spiece_model(path)
        if spiece is not None:  # (without one ComfyUI fails: "invalid tokenizer .../sd1_tokenizer")
            sd["spiece_model"] = spiece
    kind = getattr(comfy.sd.CLIPType, clip_type.upper())
    options: dict[str, Any] = {"custom_operations": operations()}
    if dtype is not None:
        options["dtype"] = dtype
    from .paths import folder_paths_module

    try:
        embeddings = folder_paths_module().get_folder_paths("embeddings")
    except (ImportError, KeyError):
        embeddings = None
    try:
        clip = comfy.sd.load_text_encoder_state_dicts(state_dicts=[sd], clip_type=kind,
                                                      model_options=options,
                                                      embedding_directory=embeddings)
    except RuntimeError as exc:  # ComfyUI builds its encoders at their released sizes
        raise _misfit(path, exc, f"ComfyUI's {clip_type} text encoder (built at its released "
                                 "size, e.g. UMT5-XXL for wan)") from exc
    if clip is None or getattr(clip, "patcher", None) is None:
        raise ComfyLoadError(f"{os.path.basename(path)}: ComfyUI did not recognise a text encoder "
                             f"in {_describe(sd)}")
    make_quant_patcher(clip.patcher)
    return clip
