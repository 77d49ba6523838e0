"""The parts of a video pipeline, described and checked against each other before any weight is
read: which model each file holds, whether they go together, which tokenizer and image encoder
the text encoder and transformer need, and the options that depend on them (the experts'
boundary, image-to-video).

Every check raises :class:`PipelineError` naming the parts and the values that disagree, so a
wrong file fails in a second, not after minutes of loading.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import GGUFError, _safe
from .serialize import same_file

__all__ = ["PipelineError", "Part", "PartSource", "describe_part", "check_parts",
           "check_experts", "resolve_tokenizer", "check_image_encoder", "default_boundary",
           "video_factors", "read_config"]

PartSource = str | os.PathLike[str] | nn.Module

#: Sub-folders of a diffusers pipeline folder, by part.
_SUBFOLDERS = {"transformer": "transformer", "transformer_2": "transformer_2",
               "text_encoder": "text_encoder", "vae": "vae"}
#: Family names each part may be (:mod:`ggufvideo.models`).
_FAMILIES = {"transformer": ("wan",), "text_encoder": ("t5-encoder",), "vae": ("wan-vae",)}
#: Config keys two Wan experts must share.
_EXPERT_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
                "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "image_dim")


#: What a diffusers/transformers folder's class name must contain, by part.
_FOLDER_CLASSES = {"transformer": ("WanTransformer3DModel", "WanVACETransformer3DModel"),
                   "text_encoder": ("T5",), "vae": ("AutoencoderKLWan",)}
#: A transformers config with only a ``model_type``: the encoder class it stands for.
_MODEL_TYPES = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}


class PipelineError(GGUFError):
    """The parts given to :func:`pipeline` do not make one pipeline (the message names them)."""


@dataclass(frozen=True)
class Part:
    """One part of a pipeline, described without reading its weights.

    Attributes:
        role: ``"transformer"``, ``"transformer_2"``, ``"text_encoder"`` or ``"vae"``.
        source: the path given (a .gguf file or a folder), or ``None`` for a module.
        family: the model family name (``"wan"``, ``"t5-encoder"``, ``"wan-vae"``), or ``None``
            when only a class is known.
        class_name: the class it builds.
        config: its config (constructor arguments / transformers config fields).
    """

    role: str
    source: str | None
    family: str | None
    class_name: str
    config: Mapping[str, Any]

    @property
    def name(self) -> str:
        return f"{self.role} ({_safe(self.source, 200) if self.source else self.class_name})"


# -- describing parts ----------------------------------------------------------------------------
def _folder(source: str, role: str) -> str:
    """A component folder: ``source`` itself, or its sub-folder for ``role`` (a pipeline folder)."""
    sub = os.path.join(source, _SUBFOLDERS.get(role, role))
    return sub if os.path.isdir(sub) else source


def describe_part(role: str, source: PartSource) -> Part:
    """The :class:`Part` for ``source`` (reads a GGUF's header or a folder's ``config.json``).

    Raises:
        FileNotFoundError: no such file or folder.
        PipelineError: a folder without ``config.json``, or a file of another kind of model.
    """
    kind = "transformer" if role == "transformer_2" else role
    if isinstance(source, nn.Module):
        cfg: Any = getattr(source, "config", None)
        # (diffusers' configs are mappings; transformers' are objects with to_dict)
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        return Part(role, None, None, type(source).__name__, values)
    path = os.fspath(source)
    if os.path.isfile(path):
        _check_file_kind(path, role)
        return _describe_checkpoint(path, role, kind)
    if os.path.isdir(path):
        folder = _folder(path, role)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise PipelineError(f"no config.json in the {role} folder (expected a diffusers/"
                                "transformers model folder or a pipeline folder with a "
                                f"{_SUBFOLDERS[role]}/ sub-folder)", path=folder)
        cfg = read_config(cfg_path)
        name = str(cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
                   or _MODEL_TYPES.get(str(cfg.get("model_type")), "?"))
        want = _FOLDER_CLASSES[kind]
        from .building import library_class

        # (a folder of another library model is refused as such below)
        if not any(w in name for w in want) and not library_class(name) and any(
                f.lower().endswith(".safetensors") for f in os.listdir(folder)):
            # a release's own folder (Wan-AI's: class "WanModel", no diffusers class, its shards
            # in the release's names): read as one checkpoint of shards, like a single file
            return _describe_checkpoint(folder, role, kind)
        if not any(w in name for w in want):
            raise PipelineError(f"the {role} must be a {' or '.join(want)} folder; its "
                                f"config.json names {_safe(name, 80)}", path=folder)
        _refuse_vace(name, role, folder)
        return Part(role, folder, None, name, cfg)
    raise FileNotFoundError(f"{role}: no such file or folder: {_safe(path, 300)}")


def _describe_checkpoint(path: str, role: str, kind: str) -> Part:
    """A part read as a checkpoint (a file, or a folder of safetensors shards) by its header."""
    from .building import describe_file
    from .errors import UnknownModelError

    try:
        desc = describe_file(path)
    except UnknownModelError as exc:
        if path.lower().endswith(".safetensors") and os.path.isfile(path) and \
                _looks_like_lora(path):  # (LoRAs are safetensors; a .pth would be read whole)
            raise PipelineError(f"the {role} is a LoRA file, not a model (pass it with "
                                "loras= / --lora)", path=path) from None
        raise PipelineError(f"the {role}: {exc.reason}", path=path) from None
    fam = desc.detection.family
    if fam.name not in _FAMILIES[kind]:
        what = "folder" if os.path.isdir(path) else "file"
        raise PipelineError(f"the {role} must be a {' or '.join(_FAMILIES[kind])} model; the "
                            f"{what} holds a {fam.title} ({desc.variant})", path=path)
    _refuse_vace(desc.class_name, role, path)
    return Part(role, path, fam.name, desc.class_name, desc.config)


def read_config(path: str) -> dict[str, Any]:
    """A ``config.json``; a malformed one is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipelineError(f"config.json is not JSON ({exc})", path=path) from None
    if not isinstance(cfg, dict):
        raise PipelineError("config.json is not a JSON object", path=path)
    return cfg


def _refuse_vace(class_name: str, role: str, path: str) -> None:
    if "VACE" in class_name:
        raise PipelineError(f"the {role} is a Wan VACE transformer: it is driven by control "
                            "videos and masks (diffusers' WanVACEPipeline), which ggufvideo's "
                            "pipeline does not build; load it with from_gguf into that pipeline",
                            path=path)


def _plain_t5(part: Part) -> bool:
    """The text encoder is known to be a T5 rather than a UMT5. A file's one-block encoder
    cannot tell (UMT5 differs by a relative-attention bias in every block): given the benefit
    of the doubt."""
    cfg = part.config
    name = part.class_name
    t5 = name in ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration") or (
        cfg.get("model_type") == "t5" and "UMT5" not in name)
    return t5 and not (part.family is not None and cfg.get("num_layers") == 1)


def _check_file_kind(path: str, role: str) -> None:
    """A part's file must be a GGUF or a safetensors checkpoint; say which it is not."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"GGUF":
        return
    if path.lower().endswith(".gguf"):
        raise PipelineError(f"the {role} is named .gguf but is not a GGUF file (it does not "
                            f"start with the GGUF magic: {len(head)}-byte start {head!r})",
                            path=path)
    from .building import SINGLE_FILE_SUFFIXES

    if not path.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise PipelineError(f"the {role} must be a .gguf file, a single .safetensors (or "
                            ".pt/.pth) checkpoint or a diffusers folder", path=path)


def _looks_like_lora(path: str) -> bool:
    from .errors import LoraError
    from .lora import read_lora

    try:
        return len(read_lora(path)) > 0
    except (LoraError, OSError, ValueError):
        return False


def _text_width(part: Part) -> int | None:
    cfg = part.config
    return cfg.get("d_model") or cfg.get("hidden_size")


def check_parts(transformer: Part, text_encoder: Part, vae: Part,
                transformer_2: Part | None = None) -> str:
    """Check that the parts make one Wan pipeline; returns ``"t2v"``, ``"i2v"`` or ``"ti2v"``.

    Raises:
        PipelineError: naming the parts and the values that disagree.
    """
    t = transformer.config
    if _plain_t5(text_encoder):
        raise PipelineError(f"Wan's text encoder is UMT5-XXL; {text_encoder.name} is a T5 encoder "
                            "(e.g. Flux's or LTX-Video's t5-v1_1-xxl), whose vocabulary and "
                            "attention differ: use a umt5-xxl encoder file")
    width = _text_width(text_encoder)
    if width is not None and t.get("text_dim") is not None and width != t["text_dim"]:
        raise PipelineError(f"the text encoder's width is {width} but the transformer expects text "
                            f"embeddings of width {t['text_dim']}: {text_encoder.name} does not "
                            f"go with {transformer.name}")
    z = vae.config.get("z_dim")
    in_ch, out_ch = t.get("in_channels"), t.get("out_channels")
    mode = "t2v"
    if z is not None and in_ch is not None:
        if out_ch != z:
            raise PipelineError(f"the VAE has {z} latent channels but the transformer outputs "
                                f"{out_ch}: {vae.name} does not go with {transformer.name}")
        if in_ch == 2 * z + 4:
            mode = "i2v"
        elif in_ch != z:
            raise PipelineError(f"the transformer takes {in_ch} input channels, which fits "
                                f"neither text-to-video ({z}) nor image-to-video ({2 * z + 4}) "
                                f"with {vae.name}'s {z} latent channels")
        elif z == 48:
            mode = "ti2v"
    if transformer_2 is not None:
        diff = [k for k in _EXPERT_KEYS
                if transformer_2.config.get(k) != t.get(k)]
        if diff:
            k = diff[0]
            raise PipelineError(f"the two experts differ in {k}: {t.get(k)!r} in "
                                f"{transformer.name}, {transformer_2.config.get(k)!r} in "
                                f"{transformer_2.name}")
    return mode


def resolve_tokenizer(text_encoder: Part, tokenizer: Any) -> Any:
    """The tokenizer for ``text_encoder``: ``tokenizer`` as given (an object), or built from what
    it names -- a tokenizer folder, a GGUF file carrying a vocabulary, a sentencepiece model
    (``spiece.model``, or a folder holding only one) -- or, when ``None``, from the text-encoder
    GGUF's own vocabulary (or a ``tokenizer/`` folder beside a text-encoder folder).

    Raises:
        PipelineError: no tokenizer can be found (saying what to pass); FileNotFoundError: a
            named tokenizer does not exist.
    """
    from .tokenizer import has_tokenizer, tokenizer_from_gguf, tokenizer_from_sentencepiece

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None and text_encoder.source is not None and text_encoder.family is not None:
        if has_tokenizer(text_encoder.source):
            return tokenizer_from_gguf(text_encoder.source)
        found = _bundled_tokenizer(text_encoder.source)
        if found is None:
            raise PipelineError("the text encoder carries no tokenizer (a GGUF file has one in "
                                "tokenizer.ggml.* metadata; a .safetensors or .pth checkpoint "
                                "never does); pass tokenizer= (--tokenizer) a tokenizer folder, "
                                "a umt5-xxl GGUF encoder or its spiece.model",
                                path=text_encoder.source)
        tokenizer = found
    folder = os.fspath(tokenizer) if tokenizer is not None else None
    if folder is not None:
        if not os.path.exists(folder):
            raise FileNotFoundError(f"tokenizer: no such file or folder: {_safe(folder, 300)}")
        if os.path.isfile(folder):
            if has_tokenizer(folder):
                return tokenizer_from_gguf(folder)
            return tokenizer_from_sentencepiece(folder)
        inside = set(os.listdir(folder))
        if "spiece.model" in inside and not inside & {"tokenizer.json", "tokenizer_config.json"}:
            return tokenizer_from_sentencepiece(os.path.join(folder, "spiece.model"))
        if not inside & {"spiece.model", "tokenizer.json", "tokenizer_config.json"}:
            raise PipelineError("the tokenizer folder holds no tokenizer (tokenizer.json, "
                                "tokenizer_config.json or spiece.model)", path=folder)
    if folder is None and text_encoder.source is not None:
        sibling = os.path.join(os.path.dirname(text_encoder.source), "tokenizer")
        folder = sibling if os.path.isdir(sibling) else text_encoder.source
    if folder is None:
        raise PipelineError("a text encoder given as a module needs tokenizer=")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _bundled_tokenizer(source: str) -> str | None:
    """A tokenizer folder shipped beside a checkpoint: ``tokenizer/``, or Wan-AI's release
    layout (``google/umt5-xxl/`` beside ``models_t5_umt5-xxl-enc-bf16.pth``)."""
    base = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    for sub in ("tokenizer", os.path.join("google", "umt5-xxl")):
        folder = os.path.join(base, sub)
        if os.path.isdir(folder):
            return folder
    return None


#: "low noise" / "high-noise" / "LowNoise" in a path (not "slow_noise").
_NOISE = re.compile(r"(?<![a-z])(low|high)[\W_]*noise")


def check_experts(transformer: Part, transformer_2: Part | None,
                  boundary_ratio: float | None) -> None:
    """Wan 2.2 A14B's two experts and their boundary: two different files, high-noise first (a
    warning when the file names say the reverse), a boundary strictly between 0 and 1 and only
    with a second expert."""
    if boundary_ratio is not None:
        if transformer_2 is None:
            raise PipelineError(f"boundary_ratio={boundary_ratio} is where a second expert takes "
                                "over: pass transformer_2 (--model-2), or drop it")
        if not 0.0 < boundary_ratio < 1.0:
            raise PipelineError(f"boundary_ratio={boundary_ratio} must lie strictly between 0 "
                                "and 1 (Wan 2.2 A14B: 0.875 for T2V, 0.9 for I2V)")
    if transformer_2 is None:
        return
    if same_file(transformer.source, transformer_2.source):
        raise PipelineError(f"{transformer.name} and {transformer_2.name} are the same file: Wan "
                            "2.2 A14B takes its high-noise and its low-noise expert")
    # (in the file or its folder's name, as people store them: low_noise, Low-Noise, LowNoise)
    said = [_NOISE.findall(os.path.normcase(os.path.abspath(p.source or "")).lower()[-200:])
            for p in (transformer, transformer_2)]
    if said[0][-1:] == ["low"] and said[1][-1:] == ["high"]:
        warnings.warn(f"{transformer.name} is named low-noise and {transformer_2.name} high-noise: "
                      "transformer (--model) is the high-noise expert, transformer_2 (--model-2) "
                      "the low-noise one; were they swapped?", stacklevel=3)


def video_factors(transformer: Part, vae: Part) -> tuple[int, int]:
    """(spatial, temporal): frame sides are multiples of ``spatial`` (the VAE's compression --
    16 for Wan 2.2's z=48 VAE, else 8 -- times the patch), frame counts ``temporal k + 1``."""
    z = vae.config.get("z_dim")
    patch = transformer.config.get("patch_size") or (1, 2, 2)
    return (16 if z == 48 else 8) * int(patch[1]), 4


def default_boundary(mode: str) -> float:
    """Where Wan 2.2 A14B's releases switch experts: 0.9 for I2V, 0.875 for T2V."""
    return 0.9 if mode == "i2v" else 0.875


def check_image_encoder(transformer: Part, mode: str, image_encoder: Any,
                        image_to_video: bool | None) -> None:
    """The image input the transformer takes: a CLIP vision encoder only for Wan 2.1 I2V/FLF2V
    (one that fits its ``image_dim``), an image only for image-to-video models (and TI2V)."""
    needs_clip = bool(transformer.config.get("image_dim"))
    if image_to_video is True and mode == "t2v":
        raise PipelineError(f"{transformer.name} is a text-to-video model: it takes no image (an "
                            "image-to-video or Wan 2.2 TI2V transformer does)")
    if image_to_video is False and mode == "i2v":
        raise PipelineError(f"{transformer.name} is an image-to-video model: it needs an image "
                            "(the first frame)")
    if image_encoder is None:
        if needs_clip:
            raise PipelineError(f"{transformer.name} is a Wan 2.1 image-to-video model: it needs "
                                "image_encoder= (--image-encoder; a CLIP vision folder or "
                                "single .safetensors file, e.g. clip_vision_h)")
        return
    if not needs_clip:
        raise PipelineError(f"{transformer.name} takes no image embeddings (only Wan 2.1 I2V and "
                            "FLF2V use a CLIP vision encoder): drop image_encoder")
    if isinstance(image_encoder, (str, os.PathLike)):
        from .building import describe_file

        path = os.fspath(image_encoder)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image encoder: no such file or folder: {_safe(path, 300)}")
        if os.path.isdir(path):
            cfg_path = os.path.join(path, "config.json")
            if not os.path.isfile(cfg_path):
                raise PipelineError("the image encoder folder has no config.json (expected a "
                                    "transformers CLIPVisionModel folder)", path=path)
            cfg = read_config(cfg_path)
            width = (cfg.get("vision_config") or cfg).get("hidden_size")
        else:
            from .errors import UnknownModelError

            try:
                desc = describe_file(path)
            except UnknownModelError as exc:
                raise PipelineError(f"the image encoder: {exc.reason}", path=path) from None
            if desc.detection.family.name != "clip-vision":
                raise PipelineError(f"the image encoder must be a CLIP vision model; the file "
                                    f"holds a {desc.detection.family.title} ({desc.variant})",
                                    path=path)
            width = desc.config.get("hidden_size")
    else:
        width = getattr(getattr(image_encoder, "config", None), "hidden_size", None)
    want = transformer.config["image_dim"]
    if width is not None and width != want:
        raise PipelineError(f"the image encoder's width is {width} but {transformer.name} takes "
                            f"image embeddings of width {want} (CLIP ViT-H/14: 1280)")
