"""Registers ggufvideo's nodes in ComfyUI.

Install: ``python -m pip install /path/to/ggufvideo`` (the repository's folder: the package is not
on PyPI) with the Python that runs ComfyUI, then copy (or symlink) this
folder into ComfyUI's ``custom_nodes`` directory and restart ComfyUI.

The folder is deliberately not named ``ggufvideo``: ComfyUI imports a custom-node folder as a
module named after the folder, which would shadow the installed ``ggufvideo`` package.
"""

try:
    from ggufvideo.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # pragma: no cover - depends on the user's environment
    raise ImportError(
        "ComfyUI-ggufvideo: the 'ggufvideo' package is not installed in ComfyUI's Python "
        "environment; run `python -m pip install /path/to/ggufvideo` (the repository's folder) with "
        "the Python that runs ComfyUI"
    ) from e

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
