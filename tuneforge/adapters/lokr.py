"""LoKr: Kronecker-product updates (the LyCORIS project; Yeh et al. 2024, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation"). peft's `LoKrConfig` field names,
tensor names and maths (peft/tuners/lokr).

    from tuneforge import LoKrConfig, add_adapter
    add_adapter(model, LoKrConfig(r=8, target_modules=["q_proj", "v_proj"]))

A Linear's weight W (out, in) is updated by a Kronecker product of a small and a larger factor:
out = l * k and in = m * n are split by `factorization` (near-square, or one side equal to
`decompose_factor`), and

    delta W = kron(w1, w2) * alpha / r        w1 (l, m), w2 (k, n)

w1 is `lokr_w1`, or the low-rank product lokr_w1_a (l, r) @ lokr_w1_b (r, m) when `decompose_both`
and r < max(l, m) / 2; w2 is `lokr_w2`, or lokr_w2_a (k, r) @ lokr_w2_b (r, n) when r < max(k, n) / 2.
A Conv1d / Conv2d factors its channels the same way; w2 then spans the kernel too: lokr_w2
(k, n, *kernel), lokr_w2_b (r, n * kernel...), or with `use_effective_conv2d` (kernel larger than 1)
the Tucker form lokr_t2 (r, r, k0, k1), lokr_w2_a (r, k), lokr_w2_b (r, n). The product is
reshaped to W's shape exactly as peft does it (torch.kron, w1 given two trailing axes when w2 has
four). transformers' Conv1D (GPT-2) and embeddings are refused, as in peft.

init_weights=True: w1 (or lokr_w1_a) starts at zero, so the model starts unchanged; "lycoris": w2 (or
lokr_w2_b) starts at zero instead (the LyCORIS repository's choice); False: all random (tests).

YAML: `finetuning_type: lokr`, `lora_rank` (r), `lora_alpha` (alpha; empty: lora_rank, peft's scale
1), `lora_target`, `additional_target`, `rank_dropout`, `module_dropout`, `rank_dropout_scale`,
`decompose_both`, `decompose_factor`. Files hold `base_model.model.<module>.lokr_w1` etc. with
peft_type "LOKR". Merging (export) adds delta W.
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

FIELDS = (*COMMON_FIELDS, "decompose_both", "decompose_factor", "rank_dropout_scale")


@dataclass
class LoKrConfig:
    """Settings of one LoKr adapter; names, meanings and defaults follow peft's `LoKrConfig`."""

    r: int = 8
    """Rank of the factors that are low-rank products (see decompose_both)."""
    alpha: float = 8
    """Scale numerator: delta W is multiplied by alpha / r."""
    rank_dropout: float = 0.0
    """Training only: probability of zeroing each output row of delta W."""
    module_dropout: float = 0.0
    """Training only: probability of skipping the whole adapter for a forward pass."""
    use_effective_conv2d: bool = False
    """Conv1d / Conv2d with a kernel larger than 1: w2 in Tucker form (lokr_t2)."""
    decompose_both: bool = False
    """Also write the small factor w1 as a rank-r product (when r < max of its sides / 2)."""
    decompose_factor: int = -1
    """Split each dimension as (factor, dim / factor) when factor divides it; -1: as near square as possible."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by rank_dropout by 1 / (fraction kept)."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear'."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    init_weights: bool | str = True
    """True: w1 starts at zero (a no-op start); 'lycoris': w2 starts at zero; False: all random (tests)."""
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
        check_config(self, "LoKr")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(f"init_weights must be true, false or 'lycoris', got {self.init_weights!r}")
        for key in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f < 1):
            raise ConfigError(f"decompose_factor must be -1 (near-square factors) or a positive integer, got {f!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """`dimension` = m * n as LyCORIS / peft split it: (factor, dimension // factor) when `factor` > 0
    divides it; otherwise the divisor pair nearest the square root with m <= factor (factor -1: no
    bound), returned with m <= n. E.g. 128 -> (8, 16), 127 -> (1, 127), (128, 4) -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        d = m + 1
        while dimension % d:
            d += 1
        if d > bound:
            break
        m, n = d, dimension // d
    return min(m, n), max(m, n)


class LoKrLayer(LycorisLayer):
    """Mixin placed before the base class (`class LoKrLinear(LoKrLayer, nn.Linear)`)."""

    method_name = "lokr"
    label = "LoKr"
    param_dicts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def create(self, name: str, r: int, cfg: LoKrConfig, geo: Geometry) -> dict[str, torch.Tensor]:
        (l, k), (m, n) = factorization(geo.out, cfg.decompose_factor), factorization(geo.in_, cfg.decompose_factor)
        full_w1 = not (cfg.decompose_both and r < max(l, m) / 2)
        full_w2 = r >= max(k, n) / 2
        t: dict[str, torch.Tensor] = {}
        if full_w1:
            t["lokr_w1"] = torch.empty(l, m)
        else:
            t["lokr_w1_a"], t["lokr_w1_b"] = torch.empty(l, r), torch.empty(r, m)
        if full_w2:
            t["lokr_w2"] = torch.empty(k, n, *geo.kernel)
        elif cfg.use_effective_conv2d and not geo.pointwise:
            t["lokr_t2"] = torch.empty(r, r, *(*geo.kernel, 1)[:2])  # Conv1d: (k, 1), as peft stores it
            t["lokr_w2_a"], t["lokr_w2_b"] = torch.empty(r, k), torch.empty(r, n)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = torch.empty(k, r), torch.empty(r, n * math.prod(geo.kernel))
        # the zero factor makes the start a no-op: w1's (init True) or w2's ('lycoris')
        zero: tuple[str, ...] = ()
        if cfg.init_weights is True:
            zero = ("lokr_w1", "lokr_w1_a")
        elif cfg.init_weights == "lycoris":
            zero = ("lokr_w2", "lokr_w2_b")
        for key, value in t.items():
            if key in zero:
                nn.init.zeros_(value)
            else:
                nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        return t

    def update(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            w1 = self.lokr_w1[name]
        else:
            w1 = self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = tucker(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous())


class LoKrLinear(LoKrLayer, nn.Linear):
    """`nn.Linear` with LoKr adapters."""


class LoKrConv2d(LoKrLayer, nn.Conv2d):
    """`nn.Conv2d` with LoKr adapters (the update runs through the layer's own convolution)."""


class LoKrConv1d(LoKrLayer, nn.Conv1d):
    """`nn.Conv1d` with LoKr adapters."""


class LoKrQuantLinear(QuantLycoris, LoKrLayer, QuantLinear):
    """LoKr over a quantized base (QuantLinear): trains as on an nn.Linear; merging is refused."""


def _to_peft(model: nn.Module, name: str, cfg: LoKrConfig, layers: list) -> dict[str, Any]:
    return {
        **common_to_peft(model, cfg, layers),
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": cfg.rank_dropout_scale,
    }


def _from_peft(raw: dict[str, Any], source: str) -> LoKrConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(LoKrConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> LoKrConfig:
    return LoKrConfig(**finetune_kwargs(finetune), decompose_both=finetune.decompose_both,
                      decompose_factor=finetune.decompose_factor, rank_dropout_scale=finetune.rank_dropout_scale)


register_method(AdapterMethod(
    name="lokr", peft_type="LOKR", label="LoKr", prefix="LoKr", config_class=LoKrConfig, layer_class=LoKrLayer,
    layers={nn.Linear: LoKrLinear, nn.Conv2d: LoKrConv2d, nn.Conv1d: LoKrConv1d, QuantLinear: LoKrQuantLinear},
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_rank", "lora_alpha", "lora_target", "additional_target", "rank_dropout", "module_dropout",
          "rank_dropout_scale", "decompose_both", "decompose_factor"),
))  # fmt: skip
