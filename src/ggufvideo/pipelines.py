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

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .loader import DTypeLike, resolve_dtype
from .lora.apply import LoraLike
from .pipeline_parts import (
    Part,
    PartSource,
    PipelineError,
    check_experts,
    check_image_encoder,
    check_parts,
    default_boundary,
    describe_part,
    resolve_tokenizer,
)

__all__ = ["pipeline", "check_parts", "PipelineError", "Part", "scheduler_config"]


def scheduler_config(flow_shift: float = 3.0) -> dict[str, Any]:
    """The UniPC flow-matching scheduler config Wan's diffusers releases ship.

    ``flow_shift``: 3.0 is Wan's choice for 480p, 5.0 for 720p.
    """
    return {"num_train_timesteps": 1000, "prediction_type": "flow_prediction",
            "use_flow_sigmas": True, "flow_shift": float(flow_shift), "solver_order": 2,
            "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
            "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


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
    if part.role in ("text_encoder", "image_encoder"):  # transformers' models
        import transformers

        cls = getattr(transformers, part.class_name, None) or transformers.UMT5EncoderModel
    else:
        import diffusers

        cls = getattr(diffusers, part.class_name, None)
        if cls is None:
            raise PipelineError(f"diffusers has no class {part.class_name!r}", path=part.source)
    model: nn.Module = cls.from_pretrained(part.source, **kwargs)
    return model.to(device) if device is not None else model


def pipeline(transformer: PartSource, text_encoder: PartSource, vae: PartSource,
             transformer_2: PartSource | None = None, *, tokenizer: Any = None,
             image_encoder: Any = None, image_processor: Any = None,
             image_to_video: bool | None = None,
             boundary_ratio: float | None = None, flow_shift: float = 3.0,
             dtype: DTypeLike = None, vae_dtype: DTypeLike = torch.float32,
             device: torch.device | str | None = None,
             vram_budget: int | str | None = None,
             loras: Sequence[tuple[LoraLike, float] | LoraLike] = (),
             loras_2: Sequence[tuple[LoraLike, float] | LoraLike] = ()) -> Any:
    """A diffusers Wan pipeline whose parts come from .gguf files, single .safetensors
    checkpoints (as ComfyUI setups hold them) or diffusers folders.

    Args:
        transformer: the Wan transformer (.gguf, .safetensors, a component folder or a pipeline
            folder, or a module); the high-noise expert for Wan 2.2 A14B.
        text_encoder: the UMT5 text encoder (a llama.cpp-named .gguf, a .safetensors -- fp8
            scaled ones too --, a folder, or a module).
        vae: the Wan VAE (.gguf, .safetensors with the release's or diffusers' names, folder,
            module).
        transformer_2: Wan 2.2 A14B's low-noise expert.
        tokenizer: a tokenizer, or a tokenizer folder, a GGUF file carrying a vocabulary or a
            sentencepiece ``spiece.model``; ``None``: from the text-encoder file's metadata (or
            the ``tokenizer/`` folder beside a text-encoder folder).
        image_encoder, image_processor: CLIP vision model (or its folder, or a single
            ``.safetensors`` such as ComfyUI's ``clip_vision_h``) and processor (default: CLIP's
            224-pixel preprocessing), needed only by Wan 2.1 I2V/FLF2V (a transformer with an
            image embedder).
        image_to_video: ``True``: the pipeline takes a first frame (an I2V model, or Wan 2.2
            TI2V-5B conditioned on an image); ``False``: text only (refused for an I2V model);
            ``None``: as the transformer is.
        boundary_ratio: with two experts, where the low-noise one takes over; default 0.9 for
            I2V experts, 0.875 for T2V (as Wan 2.2 A14B's releases ship).
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
        ``WanPipeline``, or ``WanImageToVideoPipeline`` for an image-to-video transformer (or
        TI2V with ``image_to_video=True``).

    Raises:
        PipelineError: the parts do not go together, an option does not fit them (a boundary
            without a second expert, an image encoder a text-to-video model has no use for), or
            a needed piece (tokenizer, image encoder) is missing -- all checked before any
            weight is read (:mod:`ggufvideo.pipeline_parts`).
        FileNotFoundError: a part's path does not exist.
        RuntimeError: ``vram_budget`` without a CUDA device (checked before any weight is read).
        ImportError: image-to-video without ``ftfy`` (which diffusers' I2V pipeline calls).
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
    check_experts(parts["transformer"], parts.get("transformer_2"), boundary_ratio)
    check_image_encoder(parts["transformer"], mode, image_encoder, image_to_video)
    takes_image = mode == "i2v" or (mode == "ti2v" and bool(image_to_video))
    if takes_image:
        _need_ftfy()
    tok = resolve_tokenizer(parts["text_encoder"], tokenizer)
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
    if boundary_ratio is None and transformer_2 is not None:
        boundary_ratio = default_boundary(mode)
    kwargs: dict[str, Any] = dict(tokenizer=tok, text_encoder=loaded["text_encoder"],
                                  vae=loaded["vae"], scheduler=scheduler,
                                  transformer=loaded["transformer"],
                                  transformer_2=loaded.get("transformer_2"),
                                  boundary_ratio=boundary_ratio,
                                  expand_timesteps=mode == "ti2v")
    pipe: Any
    if takes_image:
        if isinstance(image_encoder, (str, os.PathLike)):
            image_encoder, image_processor = _image_encoder(os.fspath(image_encoder),
                                                            image_processor, want, place)
        elif image_encoder is not None and image_processor is None:
            from transformers import CLIPImageProcessor

            image_processor = CLIPImageProcessor()  # CLIP's 224-pixel preprocessing
        pipe = WanImageToVideoPipeline(image_encoder=image_encoder,
                                       image_processor=image_processor, **kwargs)
    else:
        pipe = WanPipeline(**kwargs)
    pipe.ggufvideo_loras = handles
    if vram_budget is not None:
        from .runtime import stream_pipeline

        stream_pipeline(pipe, dev, vram_budget)
    return pipe


def _need_ftfy() -> None:
    """diffusers' image-to-video pipeline cleans prompts with ftfy without checking that it is
    installed: say so before anything is loaded, not as a NameError after."""
    import importlib.util

    if importlib.util.find_spec("ftfy") is None:
        raise ImportError("image-to-video needs ftfy (diffusers' Wan image-to-video pipeline "
                          "calls it): pip install ftfy, or 'ggufvideo[generate]'")


def _image_encoder(path: str, processor: Any, dtype: torch.dtype | None,
                   device: torch.device | str | None) -> tuple[Any, Any]:
    """A CLIP vision encoder (loaded as any part: a folder through from_pretrained, a single
    file through from_gguf) and its processor: the folder's own, else CLIP's (224 pixels, its
    mean and std), which a single file carries no config for."""
    from transformers import CLIPImageProcessor

    folder = os.path.isdir(path)
    part = Part("image_encoder", path, None if folder else "clip-vision", "CLIPVisionModel", {})
    model = _load(part, path, dtype, device)
    if processor is None:
        own = folder and os.path.isfile(os.path.join(path, "preprocessor_config.json"))
        processor = (CLIPImageProcessor.from_pretrained(path, local_files_only=True) if own
                     else CLIPImageProcessor())
    return model, processor


def _check_lora_fits(lf: Any, part: Part) -> None:
    """Raise the error :func:`ggufvideo.apply_lora` would (keys matching nothing, shapes that do
    not fit), from a GGUF part's header: before its weights are read. Other parts are checked
    when the LoRA is applied."""
    if part.source is None or not os.path.isfile(part.source):
        return
    from .building import checkpoint_shapes
    from .lora import resolve
    from .lora.pieces import check_fits

    shapes, arch = checkpoint_shapes(part.source)  # a GGUF's or a safetensors' header
    res = resolve(lf, shapes, architecture=arch)
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
