"""PiSSA / OLoRA adapters as plain LoRA for the original weights, and the initial adapter on disk.

At init the layer holds `W = W_res + s B0 A0`; after training it computes `W_res + s B A`. That is
`W + s (B A - B0 A0) = W + s [B, -B0] @ [A; A0]`: a plain LoRA on the ORIGINAL weight `W` with
rank 2r, `A' = cat(A, A0)` (rows) and `B' = cat(B, -B0)` (columns), and the same scaling (so
lora_alpha doubles, or grows by sqrt(2) under rsLoRA; rank_pattern / alpha_pattern follow). This is
the file peft writes with `save_pretrained(..., path_initial_model_for_weight_conversion=...)`,
with two differences: biases and modules_to_save tensors are kept (peft's conversion drops them,
which loses trained values), and rsLoRA with rank/alpha patterns is converted (peft refuses it).

Use `save_adapter(model, path, name, convert_pissa=True)` (peft_format.py) to write the converted
adapter; it needs the initial (A0, B0) that inits.py recorded when the adapter was created.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .core import lora_layers, require_state
from .inits import initial_weights, is_weight_init
from .lora import LoraLayer


def check_convertible(model: nn.Module, name: str) -> None:
    """ConfigError unless every layer of adapter `name` has its initial (A0, B0) recorded."""
    cfg = require_state(model, name).configs[name]
    if not is_weight_init(cfg.init_lora_weights):
        raise ConfigError(
            f"adapter {name!r} was initialised with init_lora_weights={cfg.init_lora_weights!r}; only "
            "PiSSA / OLoRA adapters ('pissa', 'pissa_niter_N', 'olora') need converting"
        )
    if not any(initial_weights(m, name) is not None for _, m in lora_layers(model, name)):
        raise ConfigError(
            f"adapter {name!r} has no initial PiSSA/OLoRA weights recorded; convert in the process that "
            "created or loaded the adapter"
        )


def converted_tensors(layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
    """The layer's file tensors (peft suffix -> tensor) with A and B replaced by the rank-2r pair.

    A layer the init left alone (an embedding: peft gives it the default init, its base unchanged)
    gets zeros as (A0, B0): its delta is B A on the original weight already.
    """
    A, B = layer.lora_A[name], layer.lora_B[name]
    got = initial_weights(layer, name)
    if got is None:
        A0, B0 = torch.zeros_like(A, dtype=torch.float32), torch.zeros_like(B, dtype=torch.float32)
    else:
        A0, B0 = (t.to(device=A.device, dtype=torch.float32) for t in got)
    out = {}
    for suffix, t in layer.peft_tensors(name).items():
        if t is A:
            out[suffix] = torch.cat([A.detach().float(), A0], dim=0)
        elif t is B:
            out[suffix] = torch.cat([B.detach().float(), -B0], dim=1)
        else:  # e.g. DoRA's magnitude: W_res + s B A equals W + s B' A', so it carries over as is
            out[suffix] = t
    return out


def converted_config(config: dict[str, Any]) -> dict[str, Any]:
    """peft's adapter_config.json of the converted adapter (rank doubled, same scaling, plain init)."""
    out = dict(config)
    factor = math.sqrt(2) if out.get("use_rslora") else 2  # s = alpha / r, or alpha / sqrt(r) (rsLoRA)
    out["r"] = 2 * out["r"]
    out["lora_alpha"] = out["lora_alpha"] * factor
    out["rank_pattern"] = {k: 2 * v for k, v in (out.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * factor for k, v in (out.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    return out


def save_initial_adapter(
    model: nn.Module, path: str | Path, name: str = "default", base_model_name_or_path: str | None = None
) -> Path:
    """Write adapter `name` as it was right after its PiSSA/OLoRA init (A0, B0), in peft's format:
    LLaMA-Factory's `output_dir/pissa_init`. Its config keeps the PiSSA/OLoRA init, so loading it on
    the original base (tuneforge or peft) re-runs the init and gives the untrained model back."""
    from .peft_format import save_adapter

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
