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
from .loader import load_state_dict
from .quants import dequantize, quantize
from .reader import GGUFFile, TensorInfo
from .tensor import GGMLTensor

__version__ = "0.1.0"

__all__ = [
    "GGMLTensor",
    "GGUFError",
    "GGUFFile",
    "TensorInfo",
    "load_state_dict",
    "InvalidHeaderError",
    "QuantizationError",
    "ShapeMetadataError",
    "TensorLayoutError",
    "UnsupportedTypeError",
    "dequantize",
    "quantize",
]
