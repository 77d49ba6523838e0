"""ggufvideo: run video diffusion models from GGUF-quantized weights in PyTorch."""

from __future__ import annotations

from .building import from_gguf
from .convert import convert
from .errors import (
    GGUFError,
    InvalidHeaderError,
    LoraError,
    ModelLoadError,
    QuantizationError,
    ShapeMetadataError,
    TensorLayoutError,
    TensorOperationError,
    UnknownModelError,
    UnsupportedTypeError,
)
from .imatrix import ImatrixError
from .inspection import ValidationReport, inspect_file, validate_file
from .loader import load_state_dict, resolve_dtype
from .lora import LoraHandle, apply_lora, fuse_lora
from .model import IncompatibleKeys, empty_weights, load_model
from .ops import set_compute_dtype, swap_quant_layers
from .pipelines import pipeline
from .policy import QuantPolicy, TensorDecision
from .quants import dequantize, quantize
from .reader import GGUFFile, TensorInfo
from .runtime import offload
from .tensor import GGMLTensor
from .tokenizer import tokenizer_from_gguf
from .writer import WriteSummary, save_state_dict

__version__ = "0.1.0"

__all__ = [
    "GGMLTensor",
    "GGUFError",
    "GGUFFile",
    "TensorInfo",
    "load_state_dict",
    "load_model",
    "offload",
    "empty_weights",
    "ModelLoadError",
    "UnknownModelError",
    "from_gguf",
    "pipeline",
    "tokenizer_from_gguf",
    "swap_quant_layers",
    "set_compute_dtype",
    "InvalidHeaderError",
    "QuantizationError",
    "ShapeMetadataError",
    "TensorLayoutError",
    "TensorOperationError",
    "UnsupportedTypeError",
    "dequantize",
    "quantize",
    "save_state_dict",
    "convert",
    "QuantPolicy",
    # what the functions above return or raise
    "WriteSummary",
    "TensorDecision",
    "ValidationReport",
    "IncompatibleKeys",
    "ImatrixError",
    "inspect_file",
    "validate_file",
    "resolve_dtype",
    "LoraError",
    "LoraHandle",
    "apply_lora",
    "fuse_lora",
]
