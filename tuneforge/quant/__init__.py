"""Frozen base weights in 4 bits (NF4 / FP4) or 8 bits, for QLoRA. See model.py for the entry points."""

from .io import load_quantized, save_quantized
from .linear import QuantLinear
from .model import (
    QuantizationConfig,
    dequantize_model,
    quantization_of,
    quantize_linear,
    quantize_model,
    quantized_bytes,
)

__all__ = [
    "QuantLinear",
    "QuantizationConfig",
    "dequantize_model",
    "load_quantized",
    "quantization_of",
    "quantize_linear",
    "quantize_model",
    "quantized_bytes",
    "save_quantized",
]
