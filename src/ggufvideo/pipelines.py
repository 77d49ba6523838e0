"""A diffusers video pipeline from files: each part a .gguf (kept quantized) or a diffusers folder.

``pipeline(transformer=..., text_encoder=..., vae=...)`` returns diffusers' ``WanPipeline`` (or
``WanImageToVideoPipeline`` when the transformer takes image latents: Wan 2.1 I2V, the Wan 2.2
I2V A14B experts). Wan 2.2 A14B is two expert files: ``transformer`` (high noise) and
``transformer_2`` (low noise), swapped at ``boundary_ratio`` of the schedule.

Before any weight is read, the parts are checked against each other from their names and shapes
(:func:`check_parts`): each is the right kind of model, the text encoder's width is the
transformer's text width, the VAE's latent channels fit the transformer's input and output, the
two experts have one architecture. A mismatch raises :class:`PipelineError` naming both parts.

The scheduler is built in (UniPC with flow sigmas, as Wan's releases ship it): no network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GGUFError, _safe
from .loader import DTypeLike, resolve_dtype
from .lora.apply import LoraLike

__all__ = ["pipeline", "check_parts", "PipelineError", "Part", "scheduler_config"]

PartSource = str | os.PathLike[str] | nn.Module

#: Sub-folders of a diffusers pipeline folder, by part.
_SUBFOLDERS = {"transformer": "transformer", "transformer_2": "transformer_2",
               "text_encoder": "text_encoder", "vae": "vae"}
#: Family names each part may be (:mod:`ggufvideo.models`).
_FAMILIES = {"transformer": ("wan",), "text_encoder": ("t5-encoder",), "vae": ("wan-vae",)}
#: Config keys two Wan experts must share.
_EXPERT_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels",
                "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "image_dim")


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


def scheduler_config(flow_shift: float = 3.0) -> dict[str, Any]:
    """The UniPC flow-matching scheduler config Wan's diffusers releases ship.

    ``flow_shift``: 3.0 is Wan's choice for 480p, 5.0 for 720p.
    """
    return {"num_train_timesteps": 1000, "prediction_type": "flow_prediction",
            "use_flow_sigmas": True, "flow_shift": float(flow_shift), "solver_order": 2,
            "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
            "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


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
        cfg = getattr(source, "config", {})
        return Part(role, None, None, type(source).__name__, dict(cfg))
    path = os.fspath(source)
    if os.path.isfile(path):
        from .building import describe_file

        desc = describe_file(path)
        fam = desc.detection.family
        if fam.name not in _FAMILIES[kind]:
            raise PipelineError(f"the {role} must be a {' or '.join(_FAMILIES[kind])} model; the "
                                f"file holds a {fam.title} ({desc.variant})", path=path)
        return Part(role, path, fam.name, desc.class_name, desc.config)
    if os.path.isdir(path):
        folder = _folder(path, role)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise PipelineError(f"no config.json in the {role} folder (expected a diffusers/"
                                "transformers model folder or a pipeline folder with a "
                                f"{_SUBFOLDERS[role]}/ sub-folder)", path=folder)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        name = cfg.get("_class_name") or (cfg.get("architectures") or ["?"])[0]
        return Part(role, folder, None, str(name), cfg)
    raise FileNotFoundError(f"{role}: no such file or folder: {_safe(path, 300)}")


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


# -- loading parts -------------------------------------------------------------------------------
def _load(part: Part, source: PartSource, dtype: torch.dtype | None,
          device: torch.device | str | None) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    assert part.source is not None
    if part.family is not None:  # a .gguf file
        from .building import from_gguf

        return from_gguf(part.source, dtype=dtype, device=device)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if part.role == "text_encoder":
        import transformers

        cls = getattr(transformers, part.class_name, None) or transformers.UMT5EncoderModel
    else:
        import diffusers

        cls = getattr(diffusers, part.class_name, None)
        if cls is None:
            raise PipelineError(f"diffusers has no class {part.class_name!r}", path=part.source)
    model: nn.Module = cls.from_pretrained(part.source, **kwargs)
    return model.to(device) if device is not None else model


def _tokenizer(text_encoder: Part, tokenizer: Any) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None and text_encoder.source is not None and text_encoder.family is not None:
        from .tokenizer import has_tokenizer, tokenizer_from_gguf

        if not has_tokenizer(text_encoder.source):
            raise PipelineError("the text-encoder file has no tokenizer (a GGUF file carries one "
                                "in tokenizer.ggml.* metadata; a safetensors checkpoint never "
                                "does); pass tokenizer= (--tokenizer) a tokenizer folder",
                                path=text_encoder.source)
        return tokenizer_from_gguf(text_encoder.source)
    from transformers import AutoTokenizer

    folder = os.fspath(tokenizer) if tokenizer is not None else None
    if folder is None and text_encoder.source is not None:
        sibling = os.path.join(os.path.dirname(text_encoder.source), "tokenizer")
        folder = sibling if os.path.isdir(sibling) else text_encoder.source
    if folder is None:
        raise PipelineError("a text encoder given as a module needs tokenizer=")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def pipeline(transformer: PartSource, text_encoder: PartSource, vae: PartSource,
             transformer_2: PartSource | None = None, *, tokenizer: Any = None,
             image_encoder: Any = None, image_processor: Any = None,
             boundary_ratio: float | None = None, flow_shift: float = 3.0,
             dtype: DTypeLike = None, vae_dtype: DTypeLike = torch.float32,
             device: torch.device | str | None = None,
             vram_budget: int | str | None = None,
             loras: Sequence[tuple[LoraLike, float] | LoraLike] = (),
             loras_2: Sequence[tuple[LoraLike, float] | LoraLike] = ()) -> Any:
    """A diffusers Wan pipeline whose parts come from .gguf files or diffusers folders.

    Args:
        transformer: the Wan transformer (.gguf, a component folder or a pipeline folder, or a
            module); the high-noise expert for Wan 2.2 A14B.
        text_encoder: the UMT5 text encoder (a llama.cpp-named .gguf, a folder, or a module).
        vae: the Wan VAE (.gguf, folder, module).
        transformer_2: Wan 2.2 A14B's low-noise expert.
        tokenizer: a tokenizer or its folder; ``None``: from the text-encoder file's metadata
            (or the ``tokenizer/`` folder beside a text-encoder folder).
        image_encoder, image_processor: CLIP vision model and processor, needed only by Wan 2.1
            I2V (a transformer with an image embedder).
        boundary_ratio: with two experts, where the low-noise one takes over (Wan 2.2 A14B
            ships 0.875 for T2V and 0.9 for I2V); default 0.875.
        flow_shift: the scheduler's shift (3.0 for 480p, 5.0 for 720p).
        dtype: compute dtype of the transformer(s) and text encoder (``None``: bfloat16 on CUDA,
            float32 on CPU); ``vae_dtype`` the VAE's.
        device: where the weights go (``None``: CPU; ``"cuda"`` when ``vram_budget`` is given).
        vram_budget: device bytes for weights (``"8GiB"``): the weights stay on the host and each
            part -- text encoder, image encoder, transformer, each Wan 2.2 expert, VAE -- is
            streamed to the GPU with :func:`ggufvideo.offload` under this budget while it runs,
            one part at a time (:func:`ggufvideo.runtime.stream_pipeline`;
            ``pipe._ggufvideo_stream`` is the sequence). Activations are not counted.
        loras: ``(LoRA, strength)`` pairs (or paths, ``"FILE:SCALE"`` as on the command line)
            put on the transformer with
            :func:`ggufvideo.apply_lora` (unmerged; read before any weight is); ``loras_2`` on
            the low-noise expert (Wan 2.2 LoRAs come as a high-noise and a low-noise file).
            ``pipe.ggufvideo_loras`` holds their handles (``.set_scale``, ``.remove``).

    Returns:
        ``WanPipeline``, or ``WanImageToVideoPipeline`` for an image-to-video transformer.

    Raises:
        PipelineError: the parts do not go together (checked before any weight is read), or a
            needed piece (tokenizer, image encoder) is missing.
        FileNotFoundError: a part's path does not exist.
        RuntimeError: ``vram_budget`` without a CUDA device (checked before any weight is read).
        LoraError: a LoRA file that cannot be read, or whose keys match no layer of its
            transformer (names the file and key).
    """
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    from .lora import apply_lora

    if loras_2 and transformer_2 is None:
        raise PipelineError("loras_2 are for the low-noise expert: pass transformer_2 too")
    lora_files = [_read_lora_entry(e) for e in loras]  # bad files fail before loading
    lora_files_2 = [_read_lora_entry(e) for e in loras_2]

    parts = {"transformer": describe_part("transformer", transformer),
             "text_encoder": describe_part("text_encoder", text_encoder),
             "vae": describe_part("vae", vae)}
    if transformer_2 is not None:
        parts["transformer_2"] = describe_part("transformer_2", transformer_2)
    mode = check_parts(parts["transformer"], parts["text_encoder"], parts["vae"],
                       parts.get("transformer_2"))
    needs_clip = mode == "i2v" and parts["transformer"].config.get("image_dim")
    if needs_clip and image_encoder is None:
        raise PipelineError(f"{parts['transformer'].name} is a Wan 2.1 image-to-video model: it "
                            "needs image_encoder= (a CLIP vision model or its folder)")
    tok = _tokenizer(parts["text_encoder"], tokenizer)
    for role, files in (("transformer", lora_files), ("transformer_2", lora_files_2)):
        for lf, _ in files:
            _check_lora_fits(lf, parts[role])

    if vram_budget is not None:
        _check_budget_device(vram_budget, device)
        device = device if device is not None else "cuda"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    want = resolve_dtype(dtype, dev) if dtype is not None else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    vdtype = resolve_dtype(vae_dtype, dev)
    sources: dict[str, PartSource] = {"transformer": transformer, "text_encoder": text_encoder,
                                      "vae": vae}
    if transformer_2 is not None:
        sources["transformer_2"] = transformer_2
    place = None if vram_budget is not None else device  # streamed parts stay on the host
    loaded = {role: _load(part, sources[role], vdtype if role == "vae" else want, place)
              for role, part in parts.items()}
    handles = [apply_lora(loaded[role], lf, w) for role, files in
               (("transformer", lora_files), ("transformer_2", lora_files_2)) for lf, w in files]
    scheduler = UniPCMultistepScheduler(**scheduler_config(flow_shift))
    kwargs: dict[str, Any] = dict(tokenizer=tok, text_encoder=loaded["text_encoder"],
                                  vae=loaded["vae"], scheduler=scheduler,
                                  transformer=loaded["transformer"],
                                  transformer_2=loaded.get("transformer_2"),
                                  boundary_ratio=(boundary_ratio if boundary_ratio is not None
                                                  else 0.875 if transformer_2 is not None
                                                  else None),
                                  expand_timesteps=mode == "ti2v")
    pipe: Any
    if mode == "i2v":
        if needs_clip and isinstance(image_encoder, (str, os.PathLike)):
            from transformers import CLIPImageProcessor, CLIPVisionModel

            folder = os.fspath(image_encoder)
            image_processor = image_processor or CLIPImageProcessor.from_pretrained(
                folder, local_files_only=True)
            image_encoder = CLIPVisionModel.from_pretrained(folder, local_files_only=True)
        pipe = WanImageToVideoPipeline(image_encoder=image_encoder,
                                       image_processor=image_processor, **kwargs)
    else:
        pipe = WanPipeline(**kwargs)
    pipe.ggufvideo_loras = handles
    if vram_budget is not None:
        from .runtime import stream_pipeline

        stream_pipeline(pipe, dev, vram_budget)
    return pipe


def _check_lora_fits(lf: Any, part: Part) -> None:
    """Raise the error :func:`ggufvideo.apply_lora` would (keys matching nothing, shapes that do
    not fit), from a GGUF part's header: before its weights are read. Other parts are checked
    when the LoRA is applied."""
    if part.source is None or not os.path.isfile(part.source):
        return
    from .lora import resolve
    from .lora.pieces import check_fits
    from .reader import GGUFFile

    with GGUFFile(part.source) as g:
        shapes = {name: tuple(int(d) for d in info.shape) for name, info in g.tensors.items()}
        arch = g.metadata.get("general.architecture")
    res = resolve(lf, shapes, architecture=str(arch) if arch is not None else None)
    res.check_matched(lf.source, part.name)
    check_fits(res, shapes, lf.source)


def _read_lora_entry(entry: Any) -> tuple[Any, float]:
    """``(LoRA, strength)``, or a path / ``"FILE:SCALE"`` text as the command line takes it, or
    a state dict alone (strength 1) -> (parsed LoRA, strength)."""
    from .lora import read_lora
    from .lora.bake import parse_lora_arg

    if isinstance(entry, (str, os.PathLike)):
        path, weight = parse_lora_arg(os.fspath(entry))
        return read_lora(path), weight
    if isinstance(entry, tuple) and len(entry) == 2:
        return read_lora(entry[0]), float(entry[1])
    if isinstance(entry, Mapping):
        return read_lora(entry), 1.0
    raise TypeError(f"a LoRA entry is (file or state dict, strength), a path or 'FILE:SCALE'; "
                    f"got {type(entry).__name__}")


def _check_budget_device(budget: int | str, device: torch.device | str | None) -> None:
    """A VRAM budget needs a CUDA device; say so before anything is loaded."""
    from .runtime import parse_budget

    parse_budget(budget)  # a malformed budget fails here too
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        raise PipelineError(f"vram_budget={budget!r} streams weights to a CUDA GPU, but the device "
                            f"is {str(dev)!r}: drop the budget or use device='cuda'")
    if not torch.cuda.is_available():
        raise PipelineError(f"vram_budget={budget!r} streams weights to a CUDA GPU, but CUDA is "
                            "not available in this PyTorch: drop the budget (and run on the CPU)")
