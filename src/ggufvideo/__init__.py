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
from .quants import dequantize

__version__ = "0.1.0"

__all__ = [
    "GGUFError",
    "InvalidHeaderError",
    "QuantizationError",
    "ShapeMetadataError",
    "TensorLayoutError",
    "UnsupportedTypeError",
    "dequantize",
]
