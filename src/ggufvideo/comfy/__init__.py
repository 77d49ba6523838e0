"""ggufvideo as a ComfyUI node pack (optional; ``import ggufvideo`` never imports this).

Register the nodes by putting the repository's ``custom_nodes/ComfyUI-ggufvideo`` folder (a two-line
``__init__.py`` re-exporting the mappings below) into ComfyUI's ``custom_nodes`` directory, with
ggufvideo pip-installed into ComfyUI's Python environment.

Importing this package imports only :mod:`ggufvideo.comfy.nodes`, which imports neither ComfyUI
nor torch-heavy code: folder listing and model loading happen when ComfyUI calls the nodes.

Modules:
    nodes: the node classes and ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``.
    paths: ``.gguf`` files in ComfyUI's model folders.
    loading: MODEL / VAE construction through ComfyUI's own loaders (``operations()``).
    layers: the quant-aware mixins for ComfyUI's layer classes.
    patcher: LoRA on quantized layers through ComfyUI's ``ModelPatcher``.
"""

from __future__ import annotations

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
