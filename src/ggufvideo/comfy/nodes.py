"""The ComfyUI nodes: GGUF loaders for a video diffusion model, a VAE and a text encoder; an
inspector.

Classic ComfyUI node classes (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION``). Importing this
module imports neither ComfyUI nor the loaders: the folder listing and the loading happen when
ComfyUI asks for them, so a problem there shows up as that node's error message instead of the
whole pack failing to import.
"""

from __future__ import annotations

from typing import Any

from .paths import (
    DIFFUSION_FOLDERS,
    TEXT_ENCODER_FOLDERS,
    VAE_FOLDERS,
    ModelFileError,
    list_gguf,
    resolve,
)

__all__ = ["GGUFVideoModelLoader", "GGUFVideoVAELoader", "GGUFVideoTextEncoderLoader",
           "GGUFVideoInspect",
           "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "PRECISIONS"]

CATEGORY = "ggufvideo"
#: Mirrors :data:`ggufvideo.comfy.loading.PRECISIONS` (kept here so this module stays light).
PRECISIONS: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: Mirrors :data:`ggufvideo.comfy.loading.TEXT_ENCODER_TYPES`.
TEXT_ENCODER_TYPES: tuple[str, ...] = ("wan", "ltxv", "mochi", "cosmos")

#: The folder groups the inspector lists, by the prefix shown before each file name.
_INSPECT_GROUPS: dict[str, tuple[str, ...]] = {
    DIFFUSION_FOLDERS[0]: DIFFUSION_FOLDERS,
    VAE_FOLDERS[0]: VAE_FOLDERS,
    TEXT_ENCODER_FOLDERS[0]: TEXT_ENCODER_FOLDERS,
}


class GGUFVideoModelLoader:
    """Load a video diffusion model (Wan, HunyuanVideo, ...) from a GGUF file, kept quantized."""

    DESCRIPTION = ("Loads a GGUF diffusion model from the diffusion_models (or unet) folder. "
                   "ComfyUI detects the architecture; quantized weights stay quantized and are "
                   "decoded layer by layer while sampling. LoRAs apply on top.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        """The node's inputs: a .gguf file and the compute precision."""
        return {"required": {
            "model_name": (list_gguf(DIFFUSION_FOLDERS), {"tooltip": "a .gguf diffusion model"}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "compute dtype; auto: ComfyUI's own choice for this model "
                          "(device and --*-unet options)"}),
        }}

    def load(self, model_name: str, precision: str = "auto") -> tuple[Any]:
        """Build the MODEL."""
        from .loading import load_diffusion_model

        return (load_diffusion_model(resolve(model_name, DIFFUSION_FOLDERS), precision),)


class GGUFVideoVAELoader:
    """Load a VAE (the Wan VAE) from a GGUF file, quantized convolutions kept quantized."""

    DESCRIPTION = "Loads a GGUF VAE from the vae folder; quantized Conv3d weights stay quantized."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        """The node's inputs: a .gguf file and the precision."""
        return {"required": {
            "vae_name": (list_gguf(VAE_FOLDERS), {"tooltip": "a .gguf VAE"}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "compute dtype; auto: ComfyUI's own choice for its VAE "
                          "(device and --*-vae options)"}),
        }}

    def load(self, vae_name: str, precision: str = "auto") -> tuple[Any]:
        """Build the VAE."""
        from .loading import load_vae

        return (load_vae(resolve(vae_name, VAE_FOLDERS), precision),)


class GGUFVideoTextEncoderLoader:
    """Load a T5/UMT5 text encoder (llama.cpp's GGUFs) into ComfyUI's own text-encoder classes."""

    DESCRIPTION = ("Loads a GGUF T5/UMT5 text encoder (e.g. umt5-xxl-encoder-Q8_0.gguf, llama.cpp "
                   "tensor names) from the text_encoders (or clip) folder into ComfyUI's own "
                   "text-encoder model; quantized weights, the token embedding included, stay "
                   "quantized and are decoded layer by layer.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        """The node's inputs: a .gguf file, the model it serves, the precision."""
        return {"required": {
            "clip_name": (list_gguf(TEXT_ENCODER_FOLDERS), {"tooltip": "a .gguf text encoder"}),
            "type": (list(TEXT_ENCODER_TYPES), {"default": "wan", "tooltip":
                     "the video model the encoder serves (picks ComfyUI's tokenizer)"}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip":
                          "compute dtype; auto: bfloat16 where the device supports it, "
                          "else float16"}),
        }}

    def load(self, clip_name: str, type: str = "wan", precision: str = "auto") -> tuple[Any]:  # noqa: A002
        """Build the CLIP."""
        from .loading import load_text_encoder

        return (load_text_encoder(resolve(clip_name, TEXT_ENCODER_FOLDERS), type, precision),)


class GGUFVideoInspect:
    """Show what a GGUF file holds: metadata, tensor types and sizes, restored shapes."""

    DESCRIPTION = ("Describes a GGUF file: metadata, each tensor's ggml type, its shape as the "
                   "model sees it (5-D convolution weights restored) and size, totals per type.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "inspect"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        """The node's inputs: a file from the model folders, whether to list every tensor."""
        return {"required": {
            "gguf_name": (inspect_choices(), {"tooltip": "folder/file.gguf"}),
            "list_tensors": ("BOOLEAN", {"default": True}),
        }}

    def inspect(self, gguf_name: str, list_tensors: bool = True) -> dict[str, Any]:
        """The report, as the node's output and as text shown on the node."""
        from ..inspection import format_inspection, inspect_file

        group, _, name = gguf_name.partition("/")
        if group not in _INSPECT_GROUPS or not name:
            raise ModelFileError(f"expected '<folder>/<file>.gguf' with a folder among "
                                 f"{', '.join(_INSPECT_GROUPS)}, got {gguf_name!r}")
        text = format_inspection(inspect_file(resolve(name, _INSPECT_GROUPS[group])),
                                 tensors=list_tensors)
        return {"ui": {"text": [text]}, "result": (text,)}


def inspect_choices() -> list[str]:
    """The inspector's file choices: ``<folder>/<relative name>`` for each folder group."""
    return [f"{group}/{name}" for group, folders in _INSPECT_GROUPS.items()
            for name in list_gguf(folders)]


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "GGUFVideoModelLoader": GGUFVideoModelLoader,
    "GGUFVideoVAELoader": GGUFVideoVAELoader,
    "GGUFVideoTextEncoderLoader": GGUFVideoTextEncoderLoader,
    "GGUFVideoInspect": GGUFVideoInspect,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "GGUFVideoModelLoader": "Load Video Diffusion Model (GGUF, ggufvideo)",
    "GGUFVideoVAELoader": "Load VAE (GGUF, ggufvideo)",
    "GGUFVideoTextEncoderLoader": "Load Text Encoder (GGUF, ggufvideo)",
    "GGUFVideoInspect": "Inspect GGUF File (ggufvideo)",
}
