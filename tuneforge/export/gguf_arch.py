"""Which transformers models a GGUF export can describe, and how: llama.cpp's architecture name,
tensor names, rotary layout and rope-scaling metadata. Facts of the GGUF format as llama.cpp
reads it; each architecture here is checked by reading the file back (tests/export)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ConfigError

log = logging.getLogger("tuneforge")

# HF parameter suffix inside model.layers.N -> llama.cpp tensor name inside blk.N (all archs)
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


@dataclass(frozen=True)
class Arch:
    name: str                   # general.architecture in the file
    permute_qk: bool            # llama.cpp's "llama" rotates adjacent pairs; HF rotates halves
    extra: dict = field(default_factory=dict)  # layer tensors beyond _LAYER_NAMES
    rope_freqs: bool = False    # llama.cpp reads a rope_freqs tensor (llama3-style scaling)


ARCHES = {
    "llama": Arch("llama", permute_qk=True, rope_freqs=True),
    "mistral": Arch("llama", permute_qk=True, rope_freqs=True),
    # Qwen2 rotates halves as HF does (llama.cpp's NEOX rope): no permutation; q/k/v have biases
    "qwen2": Arch("qwen2", permute_qk=False, extra={
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias"}),
    # Qwen3: RMSNorm on each head's q and k, head_dim independent of hidden_size
    "qwen3": Arch("qwen3", permute_qk=False, extra={
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}),
}


def arch_of(config) -> Arch:
    arch = ARCHES.get(config.model_type)
    if arch is None:
        raise ConfigError(f"export_format 'gguf' supports {', '.join(ARCHES)} models; this one is "
                          f"{config.model_type!r}: use export_format: hf")
    if getattr(config, "use_sliding_window", False):
        raise ConfigError("export_format 'gguf': this model attends through a sliding window, which "
                          "the GGUF metadata tuneforge writes cannot express; use export_format: hf")
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" and window and window < config.max_position_embeddings:
        # as llama.cpp's own conversion of Mistral: full attention; the same up to `window` tokens
        log.warning("GGUF export: llama.cpp attends to the whole context; this model used a "
                    "sliding window of %d tokens, so answers may differ beyond that", window)
    return arch


def tensor_name(hf_name: str, arch: Arch) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        suffix = ".".join(parts[3:])
        name = _LAYER_NAMES.get(suffix) or arch.extra.get(suffix)
        if name:
            return f"blk.{parts[2]}.{name}"
    return None  # rotary buffers etc.: llama.cpp recomputes them


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary halves split (rotate_half); llama.cpp's llama wants them
    interleaved pairwise. transformers' GGUF loader applies the inverse of this on load.
    Works for weights (rows) and biases alike."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rotary(model):
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            return module
    return None


def rope_scaling(model, arch: Arch, head_dim: int, theta: float) -> tuple[dict, np.ndarray | None]:
    """-> (rope.scaling.* metadata, rope_freqs tensor or None) for the model's rope type.

    linear: llama.cpp's own scaling keys. llama3: per-frequency divisors as a rope_freqs tensor,
    taken from the frequencies transformers itself uses (default / scaled), so the file rotates
    exactly as the model does at every position. Types whose scaling is not a fixed change of
    frequencies (yarn's attention factor, dynamic NTK, longrope) are refused, not approximated."""
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind == "default":
        return {}, None
    if kind == "linear":
        return {"type": "linear", "factor": float(rope["factor"])}, None
    if kind == "llama3" and arch.rope_freqs:
        rotary = _rotary(model)
        if rotary is None or float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise ConfigError("export_format 'gguf': could not read this model's llama3 rope frequencies")
        scaled = rotary.inv_freq.detach().double().cpu()
        base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return {}, (base / scaled).float().numpy()
    raise ConfigError(f"export_format 'gguf': rope scaling {kind!r} of this {model.config.model_type} "
                      "model is not supported (linear, and llama3 for Llama, are); use export_format: hf")
