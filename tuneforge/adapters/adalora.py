"""AdaLoRA: LoRA in SVD form whose rank budget is allocated while training (Zhang et al. 2023,
"Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"); peft's `AdaLoraConfig` field
names, tensor names, file layout and maths (peft/tuners/adalora).

    from tuneforge.adapters import AdaLoraConfig, add_adapter
    add_adapter(model, AdaLoraConfig(init_r=12, target_r=8, target_modules=["q_proj", "v_proj"], total_step=1000))

For a Linear with weight W (out, in) (transformers' Conv1D: W stored (in, out)), the adapter holds,
fp32, beside the base's own parameters:

    lora_A (r, in)   Q, the right singular vectors
    lora_E (r, 1)    Lambda, the singular values
    lora_B (out, r)  P, the left singular vectors
    y = base(x) + dropout(x) @ (lora_A * lora_E).T @ lora_B.T * lora_alpha / (ranknum + 1e-5)

where ranknum is init_r (the rank the layer was made with, kept when a file's rank_pattern loads
it at a smaller rank, as peft does; not saved). At init lora_E is zero (the model starts unchanged)
and A, B are N(0, 0.02^2); init_lora_weights=False draws all three N(0, 1) (for tests).

Training adds two things, through the training loop's generic method hooks (methods.py):
- `orth_reg_weight` x the mean over adapted matrices of ||A A^T - I||_F and ||B^T B - I||_F (the
  paper's orthogonality regulariser; peft's AdaLoraModel.forward) is added to each step's loss;
- after each optimizer step the rank allocator (adalora_allocator.py) updates the importance
  scores and masks singular values (lora_E rows set to zero) down to a budget falling from
  init_r x n to target_r x n (n adapted matrices) on a cubic schedule between tinit and
  total_step - tfinal, every deltaT steps; at total_step - tfinal the pattern is fixed and kept.

Files hold `base_model.model.<module>.lora_A` / `lora_E` / `lora_B` with peft_type "ADALORA"; a
masked adapter saves only its kept rows and writes `rank_pattern` ({"<module>.lora_E": [kept?]})
into adapter_config.json, as peft does, so peft and tuneforge load it at the allocated ranks.
Merging (export) adds lora_B @ (lora_A * lora_E) * lora_alpha / (ranknum + 1e-5) to W.

YAML: `finetuning_type: adalora` with peft's keys init_r, target_r, tinit, tfinal, deltaT, beta1,
beta2, orth_reg_weight, total_step (empty: the run's number of optimizer steps), plus lora_alpha
(empty: 2 x init_r), lora_dropout, lora_target, additional_target.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from . import adalora_allocator as allocator
from .config import ALL_LINEAR, _layer_indices, _names_or_regex
from .layer import Conv1D
from .lycoris import LycorisLayer, QuantLycoris
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields, yaml_targets
from .targets import candidate_modules, minimal_suffixes

FIELDS = (
    "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
    "rank_pattern", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
    "init_lora_weights", "fan_in_fan_out", "layers_to_transform", "layers_pattern", "bias",
)  # fmt: skip
# fields peft writes for AdaLoRA that do not change its maths here (LoraConfig's, unused by AdaLoRA)
_IGNORED = ("r", "use_rslora", "use_dora", "lora_bias", "alpha_pattern", "loftq_config", "megatron_config",
            "megatron_core", "layer_replication", "qalora_group_size", "use_qalora", "ensure_weight_tying")
EPS = 1e-5  # peft's ranknum + 1e-5


@dataclass
class AdaLoraConfig:
    """Settings of one AdaLoRA adapter; names, meanings and defaults follow peft's `AdaLoraConfig`.

    Raises ConfigError (one line naming the field) for a bad value."""

    init_r: int = 12
    """Rank each adapted matrix starts with."""
    target_r: int = 8
    """Average rank the budget ends at: the total rank becomes target_r x (adapted matrices)."""
    tinit: int = 0
    """Warm-up steps before any rank is pruned."""
    tfinal: int = 0
    """Final steps that train with the rank pattern fixed."""
    deltaT: int = 1
    """Steps between two budget allocations."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity |w * grad|."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty |sensitivity - its EMA|."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser added to the training loss."""
    total_step: int | None = None
    """Optimizer steps of the training run; None: the training loop's own count."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Set by the allocator / read from a file: {'<module>.lora_E': [row kept?]}; a module listed
    here is made with only its kept rows."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / init_r."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear'."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    init_lora_weights: bool = True
    """True: lora_E starts at zero (no-op start); False: every tensor N(0, 1) (for tests)."""
    fan_in_fan_out: bool = False
    """Weights stored (in, out) (GPT-2's Conv1D); set from the layer type as peft does."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules inside these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (e.g. 'layers'); needs layers_to_transform."""
    bias: str = "none"
    """Only 'none' (peft's other modes train biases; not supported for AdaLoRA here)."""

    def __post_init__(self) -> None:
        for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            v = getattr(self, key)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            low = 1 if key in ("init_r", "target_r", "deltaT") else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"AdaLoRA {key} must be an integer >= {low}, got {v!r}")
            setattr(self, key, v)
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRA target_r ({self.target_r}) must not exceed init_r ({self.init_r}): "
                              "the budget only falls")
        for key in ("beta1", "beta2"):
            v = getattr(self, key)
            if not _is_number(v) or not 0 < v < 1:
                raise ConfigError(f"AdaLoRA {key} must be a number in (0, 1), got {v!r}")
        if not _is_number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise ConfigError(f"AdaLoRA orth_reg_weight must be a number >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if not isinstance(self.total_step, int) or isinstance(self.total_step, bool) or self.total_step <= 0:
                raise ConfigError(f"AdaLoRA total_step must be a positive integer or empty, got {self.total_step!r}")
            allocator.check_schedule(self, self.total_step)
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for key in ("init_lora_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.bias != "none":
            raise ConfigError(f"AdaLoRA supports bias='none' only, got {self.bias!r}")
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None
        self.layers_to_transform = _layer_indices(self.layers_to_transform)
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = self.layers_pattern or None
        elif self.layers_pattern is not None:
            self.layers_pattern = _names_or_regex("layers_pattern", list(self.layers_pattern)) or None
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither (as peft)")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"layers_to_transform cannot be used when target_modules is a string "
                              f"({self.target_modules!r}); list the module names instead")
        self.rank_pattern = _rank_pattern(self.rank_pattern, self.init_r)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rank_pattern(v: Any, init_r: int) -> dict[str, list[bool]] | None:
    if v is None or v == {}:
        return None
    if not isinstance(v, dict):
        raise ConfigError(f"rank_pattern must be a dict {{'<module>.lora_E': [true/false per rank]}}, got {v!r}")
    out = {}
    for k, mask in v.items():
        if not isinstance(mask, (list, tuple)) or len(mask) != init_r or not all(isinstance(b, bool) for b in mask):
            raise ConfigError(f"rank_pattern[{k!r}] must be a list of {init_r} (init_r) true/false values, got {mask!r}")
        out[str(k)] = list(mask)
    return out


def pattern_for(cfg: AdaLoraConfig, path: str, name: str) -> list[bool] | None:
    """The kept rows `cfg.rank_pattern` gives the module at `path` (keys with or without the adapter name)."""
    if not cfg.rank_pattern:
        return None
    return cfg.rank_pattern.get(f"{path}.lora_E", cfg.rank_pattern.get(f"{path}.lora_E.{name}"))


class AdaLoraLayer(LycorisLayer):
    """Mixin placed before the base class (`class AdaLoraLinear(AdaLoraLayer, nn.Linear)`). Keeps, per
    adapter, lyco_r (rows held now), ada_ranknum (init_r), ada_dropout (p), ada_keep (the allocator's
    row mask or None) and the allocator's score state (ada_scores)."""

    method_name = "adalora"
    label = "AdaLoRA"
    param_dicts = ("lora_A", "lora_E", "lora_B")
    state_attrs = (*LycorisLayer.state_attrs, "ada_ranknum", "ada_dropout", "ada_keep", "ada_scores")

    def setup(self, base_class: type) -> None:
        super().setup(base_class)
        self.ada_ranknum: dict[str, int] = {}
        self.ada_dropout: dict[str, float] = {}
        self.ada_keep: dict[str, torch.Tensor | None] = {}
        self.ada_scores: dict[str, dict] = {}

    @property
    def fan_in_fan_out(self) -> bool:
        return isinstance(self, Conv1D)

    def _features(self) -> tuple[int, int]:
        if isinstance(self, Conv1D):
            return self.weight.shape[1], self.weight.shape[0]  # (out, in) of a weight stored (in, out)
        return self.out_features, self.in_features

    def add_from_config(self, name: str, cfg: AdaLoraConfig, path: str) -> None:
        device = self._device()
        if device.type == "meta":
            raise ConfigError(f"cannot add AdaLoRA to a module whose weight is on the meta device ({path})")
        mask = pattern_for(cfg, path, name)
        r = cfg.init_r if mask is None else sum(mask)
        out_f, in_f = self._features()
        draw = torch.randn if not cfg.init_lora_weights else (lambda *s: torch.randn(*s) * 0.02)
        tensors = {"lora_A": draw(r, in_f), "lora_E": draw(r, 1), "lora_B": draw(out_f, r)}
        if cfg.init_lora_weights:
            tensors["lora_E"].zero_()
        for attr, t in tensors.items():
            getattr(self, attr)[name] = nn.Parameter(t.to(device))
        self.lyco_r[name] = r
        self.lyco_alpha[name] = cfg.lora_alpha
        self.lyco_scaling[name] = cfg.lora_alpha / (cfg.init_r + EPS)
        for d in (self.lyco_rank_dropout, self.lyco_module_dropout):
            d[name] = 0.0
        self.lyco_rank_dropout_scale[name] = False
        self.ada_ranknum[name] = cfg.init_r
        self.ada_dropout[name] = cfg.lora_dropout
        self.ada_keep[name] = None
        self.ada_scores[name] = {}
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.ada_ranknum, self.ada_dropout, self.ada_keep, self.ada_scores):
            d.pop(name, None)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """{'lora_A': (k, in), 'lora_E': (k, 1), 'lora_B': (out, k)}: the kept rows once the allocator
        masked some (copies then), else the parameters themselves (k = rows held)."""
        a, e, b = (getattr(self, k)[name] for k in self.param_dicts)
        keep = self.ada_keep.get(name)
        if keep is None or bool(keep.all()):
            return {"lora_A": a, "lora_E": e, "lora_B": b}
        return {"lora_A": a[keep], "lora_E": e[keep], "lora_B": b[:, keep]}

    def shape_hint(self, name: str) -> str:
        return f"r={self.lyco_r[name]} of init_r={self.ada_ranknum[name]}"

    def delta_weight(self, name: str, rank_dropout: bool = False) -> torch.Tensor:
        """lora_B @ (lora_A * lora_E) * lora_alpha / (init_r + 1e-5), shaped like the base weight
        ((in, out) for Conv1D), fp32, with autograd."""
        a, e, b = (getattr(self, k)[name] for k in self.param_dicts)
        delta = (b @ (a * e)) * self.lyco_scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` + dropout(x) @ (A * E).T @ B.T * scaling per adapter, in fp32, cast back to x's dtype."""
        result = out
        for name in names:
            a, e, b = (getattr(self, k)[name] for k in self.param_dicts)
            h = x if x.dtype == a.dtype else x.to(a.dtype)
            p = self.ada_dropout[name]
            if self.training and p > 0:
                h = nn.functional.dropout(h, p=p)
            result = result + (h @ (a * e).T @ b.T) * self.lyco_scaling[name]
        return result if result.dtype == x.dtype else result.to(x.dtype)


class AdaLoraLinear(AdaLoraLayer, nn.Linear):
    """`nn.Linear` with AdaLoRA adapters (peft's SVDLinear)."""


class AdaLoraConv1D(AdaLoraLayer, Conv1D):
    """transformers' Conv1D (GPT-2, weight (in, out)) with AdaLoRA adapters (peft: fan_in_fan_out)."""


class AdaLoraQuantLinear(QuantLycoris, AdaLoraLayer, QuantLinear):
    """AdaLoRA over a quantized base (QuantLinear): trains as on an nn.Linear; merging is refused."""


def _to_peft(model: nn.Module, name: str, cfg: AdaLoraConfig, layers: list) -> dict[str, Any]:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    pattern = {}
    for path, layer in layers:
        keep, held, init_r = layer.ada_keep.get(name), layer.lyco_r[name], layer.ada_ranknum[name]
        if keep is not None and held == init_r:
            pattern[f"{path}.lora_E"] = [bool(k) for k in keep.tolist()]
        elif held < init_r:  # loaded at a smaller rank: its rows are the kept ones
            pattern[f"{path}.lora_E"] = [True] * held + [False] * (init_r - held)
    total = cfg.total_step or allocator.total_step_used(layers, name) or cfg.tinit + cfg.tfinal + 1
    return {
        "r": 8, "init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit, "tfinal": cfg.tfinal,
        "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
        # peft refuses a config without total_step; an adapter never trained writes the least that passes
        "total_step": total, "rank_pattern": pattern or None, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": targets, "exclude_modules": cfg.exclude_modules,
        "modules_to_save": cfg.modules_to_save, "bias": "none", "init_lora_weights": cfg.init_lora_weights,
        "fan_in_fan_out": any(isinstance(m, Conv1D) for _, m in layers),
        "layers_to_transform": cfg.layers_to_transform, "layers_pattern": cfg.layers_pattern,
        "use_rslora": False, "use_dora": False,
    }  # fmt: skip


def _from_peft(raw: dict[str, Any], source: str) -> AdaLoraConfig:
    warn_unknown_fields(raw, (*FIELDS, *_IGNORED), source)
    fixed = {"fan_in_fan_out": False}  # set per layer type, as peft does
    if isinstance(raw.get("target_modules"), (set, tuple)):
        fixed["target_modules"] = sorted(raw["target_modules"])
    return config_from_raw(AdaLoraConfig, raw, FIELDS, source, **fixed)


def _from_finetune_args(finetune) -> AdaLoraConfig:
    targets, extra = yaml_targets(finetune)
    alpha = finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.init_r
    return AdaLoraConfig(
        init_r=finetune.init_r, target_r=finetune.target_r, tinit=finetune.tinit, tfinal=finetune.tfinal,
        deltaT=finetune.deltaT, beta1=finetune.beta1, beta2=finetune.beta2,
        orth_reg_weight=finetune.orth_reg_weight, total_step=finetune.total_step, lora_alpha=alpha,
        lora_dropout=finetune.lora_dropout, target_modules=targets, modules_to_save=extra,
    )  # fmt: skip


register_method(AdapterMethod(
    name="adalora", peft_type="ADALORA", label="AdaLoRA", prefix="AdaLora", config_class=AdaLoraConfig,
    layer_class=AdaLoraLayer, layers={nn.Linear: AdaLoraLinear, Conv1D: AdaLoraConv1D, QuantLinear: AdaLoraQuantLinear},
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    training_loss=allocator.orthogonal_regulariser, after_step=allocator.update_and_allocate,
    training_state=allocator.training_state, load_training_state=allocator.load_training_state,
    check_run=allocator.check_run,
    keys=("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
          "lora_alpha", "lora_dropout", "lora_target", "additional_target"),
))  # fmt: skip
