"""Export around quantization: a quantized base is dequantized before merging, and the merged
model can be quantized again (`export_quantization_bit`) by bitsandbytes through transformers'
BitsAndBytesConfig and saved in transformers' own bitsandbytes serialisation, so that
`AutoModelForCausalLM.from_pretrained(export_dir)` loads exactly those weights (bitsandbytes
installed). tuneforge's private quantized format (tuneforge.quant.save_quantized) is never what an
export writes: transformers would read its config.json and fill every projection with random weights.

Both steps change weights, so both say so in one line each: the merge holds dequant(W) with the adapter
merged in (LoRA: dequant(W) + BA; IA3: dequant(W) scaled by its vectors; what
the adapter was trained against, not the original fp weights), and quantizing adds an error
that is measured on the quantized layers and printed.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..quant import dequantize_model, quantization_of

log = logging.getLogger("tuneforge")


def dequantize_before_merge(model: nn.Module) -> nn.Module:
    """A quantized model back to fp32 Linear layers (in place), with a note; others unchanged."""
    cfg = quantization_of(model)
    if cfg is None:
        return model
    kind = f"{cfg.bits}-bit {cfg.quant_type if cfg.bits == 4 else 'int8'}"
    dequantize_model(model, torch.float32)
    log.warning("base model is quantized (%s): dequantized to float32 before merging; the export holds "
                "the adapter merged into dequant(W) (for LoRA: dequant(W) + BA), the weights the adapter was "
                "trained with, not the original fp weights", kind)
    return model


def bitsandbytes_missing() -> str | None:
    """Why export_quantization_bit cannot run here (None: it can)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return ("config key 'export_quantization_bit' writes transformers' bitsandbytes format, which needs the "
                "bitsandbytes package: pip install bitsandbytes, or use export_format: gguf with "
                "export_quantization: q4_0 or q8_0")
    return None


def bnb_config(bits: int, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `bits` (4: nf4 / fp4 blocks of 64, optionally with
    8-bit scales; 8: LLM.int8 rows)."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def quantize_saved(folder, quantization, dtype: torch.dtype) -> nn.Module:
    """The model saved in `folder` loaded by transformers with `quantization` (BitsAndBytesConfig):
    bitsandbytes quantizes its Linear layers (all but the output head), on the CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=quantization, dtype=dtype,
                                                device_map="cpu").eval()


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor | None:
    """A bitsandbytes Linear4bit / Linear8bitLt layer's weight as float32 (None: not one)."""
    import bitsandbytes as bnb

    weight = getattr(layer, "weight", None)
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    return None


@torch.no_grad()
def quantization_error(quantized: nn.Module, merged: dict[str, torch.Tensor], describe: str) -> tuple[float, float]:
    """Log and return (relative Frobenius error, max abs error) of the quantized layers of
    `quantized` against `merged` (module path -> the fp weight it quantized):
    ||W - dequant(quant(W))|| / ||W|| over all quantized layers together."""
    diff_sq = ref_sq = max_abs = 0.0
    layers = 0
    for path, module in quantized.named_modules():
        w = dequantized_weight(module)
        if w is None or path not in merged:
            continue
        ref = merged[path].detach().float()
        err = w - ref
        diff_sq += float(err.double().square().sum())
        ref_sq += float(ref.double().square().sum())
        max_abs = max(max_abs, float(err.abs().max()))
        layers += 1
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0
    log.warning("quantized the merged weights of %d layers to %s with bitsandbytes: relative error "
                "||W - dequant(quant(W))|| / ||W|| = %.4g, max abs error %.4g", layers, describe, rel, max_abs)
    return rel, max_abs
