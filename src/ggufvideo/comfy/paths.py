"""Finding ``.gguf`` files in ComfyUI's model folders.

ComfyUI's own ``folder_paths.get_filename_list`` filters by the extensions registered for a
folder, and ``.gguf`` is not among them; so the folders are walked here. The folder registry is
only *read* (nothing is registered), and ``folder_paths`` is imported when a node asks, never at
module import.

A folder can be reachable under two names (ComfyUI maps the legacy ``unet`` to
``diffusion_models``, and users list the same directory twice in ``extra_model_paths.yaml``): each
directory is walked once and each relative name listed once, first folder first, which is also
the folder :func:`resolve` takes a name from (as ComfyUI's ``get_full_path`` does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from ..errors import GGUFError, _safe

__all__ = ["folder_paths_module", "model_dirs", "list_gguf", "resolve", "ModelFileError",
           "DIFFUSION_FOLDERS", "VAE_FOLDERS", "TEXT_ENCODER_FOLDERS"]

#: ComfyUI folder names searched for diffusion models.
DIFFUSION_FOLDERS: tuple[str, ...] = ("diffusion_models", "unet")
#: ComfyUI folder names searched for VAEs.
VAE_FOLDERS: tuple[str, ...] = ("vae",)
#: ComfyUI folder names searched for text encoders (``clip`` is the legacy name).
TEXT_ENCODER_FOLDERS: tuple[str, ...] = ("text_encoders", "clip")

#: ``folder_name -> list of directories`` (ComfyUI's ``folder_paths.get_folder_paths``).
FolderLookup = Callable[[str], Sequence[str]]


class ModelFileError(GGUFError):
    """A model file named in a node could not be found in ComfyUI's folders."""


def folder_paths_module():  # type: ignore[no-untyped-def]
    """ComfyUI's ``folder_paths`` module (upstream: top level; pip fork: ``comfy.cmd``)."""
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        try:
            from comfy.cmd import folder_paths  # type: ignore[import-not-found,no-redef]
        except ImportError as e:
            raise ImportError("ggufvideo.comfy needs ComfyUI's 'folder_paths' module: run it "
                              "inside ComfyUI") from e
    return folder_paths


def _default_lookup(name: str) -> Sequence[str]:
    return folder_paths_module().get_folder_paths(name)


def model_dirs(folder_names: Iterable[str], lookup: FolderLookup | None = None) -> list[str]:
    """The directories registered under ``folder_names``, deduplicated, in order.

    Unknown folder names are skipped (older ComfyUI versions lack ``diffusion_models``).
    """
    lookup = lookup or _default_lookup
    seen: set[str] = set()
    out: list[str] = []
    for name in folder_names:
        try:
            dirs = list(lookup(name))
        except (KeyError, ValueError):
            continue
        for d in dirs:
            key = os.path.normcase(os.path.realpath(d))
            if key not in seen:
                seen.add(key)
                out.append(d)
    return out


def list_gguf(folder_names: Iterable[str], lookup: FolderLookup | None = None) -> list[str]:
    """Relative names (``/``-separated) of the ``.gguf`` files under ``folder_names``, sorted.

    Subfolders are included and symlinked folders followed (as ComfyUI does); a name found in
    several folders is listed once.
    """
    names: set[str] = set()
    for base in model_dirs(folder_names, lookup):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for f in files:
                if f.lower().endswith(".gguf") and not f.startswith("."):
                    rel = os.path.relpath(os.path.join(root, f), base)
                    names.add(rel.replace(os.sep, "/"))
    return sorted(names, key=str.lower)


def resolve(name: str, folder_names: Sequence[str], lookup: FolderLookup | None = None) -> str:
    """The full path of ``name`` (as listed by :func:`list_gguf`) in the first folder holding it.

    Raises:
        ModelFileError: no such file, or a name that escapes its folder (``../``, absolute).
    """
    dirs = model_dirs(folder_names, lookup)
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ModelFileError(f"invalid model file name {_safe(name)!r}: expected a name relative "
                             f"to ComfyUI's {'/'.join(folder_names)} folders")
    for base in dirs:
        candidate = os.path.join(base, *name.split("/"))
        if os.path.isfile(candidate):
            return candidate
    searched = ", ".join(dirs) if dirs else "none registered"
    raise ModelFileError(f"model file {_safe(name)!r} not found in ComfyUI's "
                         f"{'/'.join(folder_names)} folders (searched: {searched})")
