"""Export around quantization: a quantized base is dequantized before merging, and the merged
model can be requantized (`export_quantization_bit`) and saved in tuneforge's quantized format.

Both steps change weights, so both say so in one line each: the merge holds dequant(W) with the adapter
merged in (LoRA: dequant(W) + BA; IA3: dequant(W) scaled by its vectors; what
the adapter was trained against, not the original fp weights), and requantizing adds an error
that is measured and printed.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..quant import QuantizationConfig, QuantLinear, dequantize_model, quantization_of, quantize_model
from ..quant.model import quantizable_linears

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


@torch.no_grad()
def requantize(model: nn.Module, cfg: QuantizationConfig) -> tuple[float, float]:
    """Quantize the merged model in place; returns and logs (relative Frobenius error, max abs error).

    The error is ||W - dequant(quant(W))|| / ||W|| over all quantized layers together.
    """
    merged = {path: lin.weight for path, lin in quantizable_linears(model, cfg.skip_modules)}
    quantize_model(model, config=cfg)
    diff_sq = ref_sq = 0.0
    max_abs = 0.0
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear) and path in merged:
            w = merged.pop(path).detach().float()
            err = m.dequantize(torch.float32) - w
            diff_sq += float(err.double().square().sum())
            ref_sq += float(w.double().square().sum())
            max_abs = max(max_abs, float(err.abs().max()))
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0
    log.warning("requantized the merged weights to %s: relative error ||W - dequant(quant(W))|| / ||W|| = "
                "%.4g, max abs error %.4g", cfg.describe(), rel, max_abs)
    return rel, max_abs
