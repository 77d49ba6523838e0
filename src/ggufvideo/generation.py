"""Running a video pipeline and writing what it makes: the video and a contact sheet of frames.

The video goes through diffusers' ``export_to_video`` (imageio + imageio-ffmpeg:
``pip install 'ggufvideo[video]'``); the contact sheet is a PNG grid of evenly spaced frames
(Pillow, which diffusers already needs), written even when no video writer is installed.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import GGUFError

__all__ = ["generate", "check_video_size", "write_video", "contact_sheet", "VideoSizeError"]


class VideoSizeError(GGUFError):
    """A frame count or frame size the model cannot make (the message says which values fit)."""


def check_video_size(frames: int, height: int, width: int, *, spatial: int = 16,
                     temporal: int = 4) -> None:
    """Check a request before any heavy work: Wan makes ``4k + 1`` frames of multiples of 16.

    ``spatial``: the VAE's spatial factor times the transformer's patch size (8 * 2 for Wan 2.1,
    16 * 2 for Wan 2.2's TI2V VAE); ``temporal``: the VAE's temporal factor.

    Raises:
        VideoSizeError: naming the bad value and the nearest good ones.
    """
    if frames < 1 or (frames - 1) % temporal:
        lo = max(1, (frames - 1) // temporal * temporal + 1)
        raise VideoSizeError(f"--frames {frames}: the model makes {temporal}k+1 frames (e.g. "
                             f"{lo} or {lo + temporal})")
    for name, v in (("height", height), ("width", width)):
        if v < spatial or v % spatial:
            lo = max(spatial, v // spatial * spatial)
            raise VideoSizeError(f"--{name} {v}: must be a multiple of {spatial} (e.g. {lo} or "
                                 f"{lo + spatial})")


def generate(pipe: Any, prompt: str, *, negative_prompt: str | None = None, frames: int = 33,
             height: int = 480, width: int = 832, steps: int = 30, guidance: float = 5.0,
             seed: int = 0, image: Any = None, progress: bool = True,
             max_sequence_length: int = 512) -> np.ndarray:
    """Run ``pipe`` (a Wan pipeline) once; the frames as float32 ``(frames, height, width, 3)``
    in ``[0, 1]``. A progress bar runs over the denoising steps unless ``progress`` is false."""
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8)) * int(
        pipe.transformer.config.patch_size[1])
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
    check_video_size(frames, height, width, spatial=spatial, temporal=temporal)
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")
    kwargs: dict[str, Any] = dict(prompt=prompt, negative_prompt=negative_prompt, height=height,
                                  width=width, num_frames=frames, num_inference_steps=steps,
                                  guidance_scale=guidance, output_type="np",
                                  generator=torch.Generator("cpu").manual_seed(seed),
                                  max_sequence_length=max_sequence_length)
    if image is not None:
        kwargs["image"] = image
    with torch.inference_mode():
        out = pipe(**kwargs).frames[0]
    return np.asarray(out, dtype=np.float32)


def _uint8(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    arr = np.asarray(frames, dtype=np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str | os.PathLike[str], fps: int = 16) -> str:
    """Write ``frames`` (``(n, h, w, 3)`` floats in [0, 1]) as a video with diffusers'
    ``export_to_video`` (imageio-ffmpeg).

    Raises:
        ImportError: imageio / imageio-ffmpeg are not installed (names the extra to install).
    """
    try:
        import imageio  # noqa: F401
        importlib.import_module("imageio_ffmpeg")  # only present or not: it has no type stubs
    except ImportError:
        raise ImportError("writing a video needs imageio and imageio-ffmpeg: pip install "
                          "'ggufvideo[video]' (the contact sheet PNG was written)") from None
    from diffusers.utils import export_to_video

    path = os.fspath(path)
    export_to_video(list(np.asarray(frames, dtype=np.float32)), path, fps=fps,
                    macro_block_size=1)
    return path


def contact_sheet(frames: np.ndarray, path: str | os.PathLike[str], *, count: int = 8,
                  columns: int = 4) -> str:
    """A PNG grid of ``count`` evenly spaced frames (all of them when there are fewer)."""
    from PIL import Image

    arr = _uint8(frames)
    n = arr.shape[0]
    picks = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(min(count, n))})
    cols = min(columns, len(picks))
    rows = math.ceil(len(picks) / cols)
    h, w = arr.shape[1:3]
    sheet = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, i in enumerate(picks):
        r, c = divmod(k, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    path = os.fspath(path)
    Image.fromarray(sheet).save(path)
    return path
