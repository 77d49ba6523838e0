"""LoRA on quantized models: unmerged in the forward, every common file format, baked into a GGUF.

* :func:`apply_lora` -- put a LoRA on a model (ggufvideo-quantized or plain torch, diffusers' or the
  original release's names) as adapters beside the weights; returns a :class:`LoraHandle`
  (``.set_scale``, ``.remove``). Several stack.
* :func:`fuse_lora` -- merge a LoRA into the model's quantized weights for good (requantized to
  each weight's own type with the exact quantizer).
* ``ggufvideo convert SRC DST --lora FILE[:SCALE]`` -- bake LoRAs into a new file
  (:mod:`ggufvideo.lora.bake`).
* :func:`read_lora` -- parse kohya/musubi, LyCORIS (LoCon, LoHa, LoKr), ComfyUI/original and
  diffusers/peft files (:mod:`ggufvideo.lora.formats`; scales kept in a peft config:
  :mod:`ggufvideo.lora.config`); their names are mapped onto a model's by
  :mod:`ggufvideo.lora.targets`; what each piece becomes on a tensor is
  :mod:`ggufvideo.lora.pieces` (LoHa/LoKr factors: :mod:`ggufvideo.lora.lycoris`, a DoRA
  magnitude: :mod:`ggufvideo.lora.dora`).

The layer-side math is :class:`ggufvideo.ops.LoraAdapter` / :class:`ggufvideo.ops.KronAdapter` /
:class:`ggufvideo.ops.DoraAdapter` / :func:`ggufvideo.ops.lora_linear`.
"""

from __future__ import annotations

from .apply import LoraHandle, apply_lora, fuse_lora
from .formats import LoraEntry, LoraFile, parse_lora, read_lora
from .targets import resolve

__all__ = ["LoraHandle", "apply_lora", "fuse_lora", "LoraEntry", "LoraFile", "parse_lora",
           "read_lora", "resolve"]
