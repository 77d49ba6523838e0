"""ggufvideo: run video diffusion models from GGUF-quantized weights in PyTorch."""

from __future__ import annotations

from .errors import (
    GGUFError,
    InvalidHeaderError,
    QuantizationError,
    ShapeMetadataError,
    TensorLayoutError,
    UnsupportedTypeError,
)
from .building import from_gguf
from .convert import convert
from .loader import load_state_dict
from .errors import ModelLoadError, UnknownModelError
from .model import empty_weights, load_model
from .ops import set_compute_dtype, swap_quant_layers
from .policy import QuantPolicy
from .quants import dequantize, quantize
from .reader import GGUFFile, TensorInfo
from .tensor import GGMLTensor
from .writer import save_state_dict
from .errors import LoraError
from .lora import LoraHandle, apply_lora, fuse_lora

__version__ = "0.1.0"

__all__ = [
    "GGMLTensor",
    "GGUFError",
    "GGUFFile",
    "TensorInfo",
    "load_state_dict",
    "load_model",
    "empty_weights",
    "ModelLoadError",
    "UnknownModelError",
    "from_gguf",
    "swap_quant_layers",
    "set_compute_dtype",
    "InvalidHeaderError",
    "QuantizationError",
    "ShapeMetadataError",
    "TensorLayoutError",
    "UnsupportedTypeError",
    "dequantize",
    "quantize",
    "save_state_dict",
    "convert",
    "QuantPolicy",
    "LoraError",
    "LoraHandle",
    "apply_lora",
    "fuse_lora",
]
