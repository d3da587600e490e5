"""PiSSA / OLoRA adapters as plain LoRA for the original weights, and the initial adapter on disk.

At init the layer holds `W = W_res + s B0 A0`; after training it computes `W_res + s B A`. That is
`W + s (B A - B0 A0) = W + s [B, -B0] @ [A; A0]`: a plain LoRA on the ORIGINAL weight `W` with
rank 2r, `A' = cat(A, A0)` (rows) and `B' = cat(B, -B0)` (columns), and the same scaling (so
lora_alpha doubles, or grows by sqrt(2) under rsLoRA; rank_pattern / alpha_pattern follow). This is
the file peft writes with `save_pretrained(..., path_initial_model_for_weight_conversion=...)`,
with two differences: biases and modules_to_save tensors are kept (peft's conversion drops them,
which loses trained values), and rsLoRA with rank/alpha patterns is converted (peft refuses it).

Use `save_adapter(model, path, name, convert_pissa=True)` (peft_format.py) to write the converted
adapter; it needs the initial (A0, B0) that inits.py recorded when the adapter was created. The
maths (`converted_tensors`, `converted_config`) lives with the inits in inits.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .core import lora_layers, require_state
from .inits import check_convertible as _check_layers
from .inits import converted_config, converted_tensors, initial_weights
from .peft_format import save_adapter

__all__ = ["check_convertible", "converted_config", "converted_tensors", "save_initial_adapter"]


def check_convertible(model: nn.Module, name: str) -> None:
    """ConfigError unless every layer of adapter `name` has its initial (A0, B0) recorded."""
    cfg = require_state(model, name).configs[name]
    _check_layers(cfg, name, [m for _, m in lora_layers(model, name)])


def save_initial_adapter(
    model: nn.Module, path: str | Path, name: str = "default", base_model_name_or_path: str | None = None
) -> Path:
    """Write adapter `name` as it was right after its PiSSA/OLoRA init (A0, B0), in peft's format:
    LLaMA-Factory's `output_dir/pissa_init`. Its config keeps the PiSSA/OLoRA init, so loading it on
    the original base (tuneforge or peft) re-runs the init and gives the untrained model back."""
    check_convertible(model, name)
    layers = [m for _, m in lora_layers(model, name)]
    trained = [(m.lora_A[name].detach().clone(), m.lora_B[name].detach().clone()) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                A0, B0 = initial_weights(m, name)
                m.lora_A[name].copy_(A0)
                m.lora_B[name].copy_(B0)
        return save_adapter(model, path, name, base_model_name_or_path)
    finally:
        with torch.no_grad():
            for m, (A, B) in zip(layers, trained):
                m.lora_A[name].copy_(A)
                m.lora_B[name].copy_(B)
