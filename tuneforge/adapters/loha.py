"""LoHa: low-rank Hadamard product updates (Hyeon-Woo et al. 2022, "FedPara"; the LyCORIS project).
peft's `LoHaConfig` field names, tensor names and maths (peft/tuners/loha).

    from tuneforge import LoHaConfig, add_adapter
    add_adapter(model, LoHaConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"]))

For a Linear with weight W (out, in), adapter tensors (fp32, beside the base's own parameters):

    hada_w1_a (out, r)  hada_w1_b (r, in)  hada_w2_a (out, r)  hada_w2_b (r, in)
    delta W = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / r        (* : element-wise)

so a rank-r pair reaches rank up to r^2. A Conv1d / Conv2d uses the same matrices over the
flattened kernel (in * k...), or, with `use_effective_conv2d` and a kernel larger than 1, FedPara's
"Proposition 3" (Tucker) form: hada_t1 / hada_t2 (r, r, k0, k1) with w*_a (r, out), w*_b (r, in),
each factor rebuilt as einsum('ijkl,jr,ip->prkl', t, w_b, w_a). transformers' Conv1D (GPT-2) and
embeddings are refused, as in peft. At init (init_weights=True) hada_w2_b is zero, so the model
starts unchanged; init_weights=False draws every tensor at random (for tests).

YAML: `finetuning_type: loha`, `lora_rank` (r), `lora_alpha` (alpha; empty: lora_rank, i.e. peft's
scale 1), `lora_target`, `additional_target`, `rank_dropout`, `module_dropout`. Files hold
`base_model.model.<module>.hada_w1_a` etc. with peft_type "LOHA". Merging (export) adds delta W.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from .lycoris import (
    COMMON_FIELDS,
    Geometry,
    LycorisLayer,
    QuantLycoris,
    check_config,
    common_to_peft,
    finetune_kwargs,
    tucker,
)
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields

FIELDS = COMMON_FIELDS


@dataclass
class LoHaConfig:
    """Settings of one LoHa adapter; names, meanings and defaults follow peft's `LoHaConfig`."""

    r: int = 8
    """Rank of each of the two low-rank products."""
    alpha: float = 8
    """Scale numerator: delta W is multiplied by alpha / r."""
    rank_dropout: float = 0.0
    """Training only: probability of zeroing each output row of delta W (kept rows rescaled)."""
    module_dropout: float = 0.0
    """Training only: probability of skipping the whole adapter for a forward pass."""
    use_effective_conv2d: bool = False
    """Conv1d / Conv2d with a kernel larger than 1: FedPara's Tucker form (hada_t1 / hada_t2)."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear'."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    init_weights: bool = True
    """True: hada_w2_b starts at zero (the adapter starts as a no-op); False: all random (for tests)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. 'layers', 'h'); needs layers_to_transform."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the end of the module name: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex matched against the end of the module name: alpha}."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""

    def __post_init__(self) -> None:
        check_config(self, "LoHa")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be true or false, got {self.init_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Hadamard(torch.autograd.Function):
    """(a1 @ b1) * (a2 @ b2) keeping only the four factors for backward (the two products, each as
    large as the weight, are recomputed there), in the factors' dtype even under autocast."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2):
        ctx.save_for_backward(a1, b1, a2, b2)
        with torch.autocast(a1.device.type, enabled=False):
            return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        grad = grad.to(a1.dtype)
        need = ctx.needs_input_grad
        out = [None, None, None, None]
        if need[0] or need[1]:
            g = grad * (a2 @ b2)  # d/d(a1 @ b1)
            out[0] = g @ b1.T if need[0] else None
            out[1] = a1.T @ g if need[1] else None
        if need[2] or need[3]:
            g = grad * (a1 @ b1)
            out[2] = g @ b2.T if need[2] else None
            out[3] = a2.T @ g if need[3] else None
        return tuple(out)


class LoHaLayer(LycorisLayer):
    """Mixin placed before the base class (`class LoHaLinear(LoHaLayer, nn.Linear)`)."""

    method_name = "loha"
    label = "LoHa"
    param_dicts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def create(self, name: str, r: int, cfg: LoHaConfig, geo: Geometry) -> dict[str, torch.Tensor]:
        if cfg.use_effective_conv2d and not geo.pointwise:
            k = (*geo.kernel, 1)[:2]  # Conv1d: (k, 1), as peft stores it
            t = {"hada_t1": torch.empty(r, r, *k), "hada_t2": torch.empty(r, r, *k)}
            w = {"hada_w1_a": torch.empty(r, geo.out), "hada_w1_b": torch.empty(r, geo.in_),
                 "hada_w2_a": torch.empty(r, geo.out), "hada_w2_b": torch.empty(r, geo.in_)}  # fmt: skip
        else:
            flat_in = geo.in_ * math.prod(geo.kernel)
            t = {}
            w = {"hada_w1_a": torch.empty(geo.out, r), "hada_w1_b": torch.empty(r, flat_in),
                 "hada_w2_a": torch.empty(geo.out, r), "hada_w2_b": torch.empty(r, flat_in)}  # fmt: skip
        tensors = {**w, **t}
        for key, value in tensors.items():  # He init (FedPara); w2_b zero makes the start a no-op
            if key == "hada_w2_b" and cfg.init_weights:
                nn.init.zeros_(value)
            else:
                nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        return tensors

    def update(self, name: str) -> torch.Tensor:
        a1, b1, a2, b2 = (getattr(self, k)[name] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if name in self.hada_t1:
            return tucker(self.hada_t1[name], a1, b1) * tucker(self.hada_t2[name], a2, b2)
        return _Hadamard.apply(a1, b1, a2, b2)


class LoHaLinear(LoHaLayer, nn.Linear):
    """`nn.Linear` with LoHa adapters."""


class LoHaConv2d(LoHaLayer, nn.Conv2d):
    """`nn.Conv2d` with LoHa adapters (the update runs through the layer's own convolution)."""


class LoHaConv1d(LoHaLayer, nn.Conv1d):
    """`nn.Conv1d` with LoHa adapters."""


class LoHaQuantLinear(QuantLycoris, LoHaLayer, QuantLinear):
    """LoHa over a quantized base (QuantLinear): trains as on an nn.Linear; merging is refused."""


def _to_peft(model: nn.Module, name: str, cfg: LoHaConfig, layers: list) -> dict[str, Any]:
    return common_to_peft(model, cfg, layers)


def _from_peft(raw: dict[str, Any], source: str) -> LoHaConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(LoHaConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> LoHaConfig:
    return LoHaConfig(**finetune_kwargs(finetune))


register_method(AdapterMethod(
    name="loha", peft_type="LOHA", label="LoHa", prefix="LoHa", config_class=LoHaConfig, layer_class=LoHaLayer,
    layers={nn.Linear: LoHaLinear, nn.Conv2d: LoHaConv2d, nn.Conv1d: LoHaConv1d, QuantLinear: LoHaQuantLinear},
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_rank", "lora_alpha", "lora_target", "additional_target", "rank_dropout", "module_dropout"),
))  # fmt: skip
