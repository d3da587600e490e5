"""What the LyCORIS methods LoHa (loha.py) and LoKr (lokr.py) share: a weight update built from
small factors, added to the base layer's output, merged by adding it to the weight.

Both follow peft's `LycorisLayer` (peft/tuners/lycoris_utils.py) and the LyCORIS project
(KohakuBlueleaf/LyCORIS): for an adapted layer with weight W (out, in[, *kernel]),

    y = base(x) + op(x, delta)       op: F.linear for Linear, the layer's own convolution for Conv1d / Conv2d
    delta = update(factors) * alpha / r, reshaped to W's shape

where `update` is the method's (LoHa: a Hadamard product of two low-rank products; LoKr: a
Kronecker product). The factors are fp32 `nn.ParameterDict`s keyed by adapter name under peft's
tensor names (`<module>.hada_w1_a.<adapter>`), so files hold `base_model.model.<module>.hada_w1_a`.

Training only (peft's semantics, random, so tests run them at 0):
- `module_dropout` p: the whole adapter is skipped for a forward with probability p;
- `rank_dropout` p: each output row of `delta` is zeroed with probability p, the kept rows
  rescaled by 1 / (fraction kept) (LoHa always; LoKr with `rank_dropout_scale`).
In eval mode neither applies, so outputs equal peft's.

Merging adds `delta` (fp32) into the weight; unmerging subtracts it (newest first). A quantized base
(QuantLinear) cannot be merged into (its `cannot_merge` says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.errors import ConfigError, ModelError

from .config import ALL_LINEAR, _check_regex, _layer_indices, _names_or_regex
from .layer import AdapterLayer
from .targets import candidate_modules, minimal_suffixes, pattern_value

# fields of adapter_config.json both methods have (peft's LycorisConfig + LoHaConfig / LoKrConfig)
COMMON_FIELDS = (
    "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "target_modules", "exclude_modules",
    "init_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save",
)  # fmt: skip


# ---- config checks ----------------------------------------------------------------------------
def check_config(cfg: Any, label: str) -> None:
    """Validate and normalise the fields every LyCORIS config has, in place; ConfigError (one line
    naming the field) for a bad value. `label` names the method in messages ('LoHa')."""
    cfg.r = _positive_int("r", cfg.r, label)
    cfg.alpha = _positive_number("alpha", cfg.alpha)
    for key in ("rank_dropout", "module_dropout"):
        v = getattr(cfg, key)
        if not _is_number(v) or not 0.0 <= v < 1.0:
            raise ConfigError(f"{key} must be a number in [0, 1), got {v!r}")
        setattr(cfg, key, float(v))
    if not isinstance(cfg.use_effective_conv2d, bool):
        raise ConfigError(f"use_effective_conv2d must be true or false, got {cfg.use_effective_conv2d!r}")
    cfg.target_modules = _names_or_regex("target_modules", cfg.target_modules)
    cfg.exclude_modules = _names_or_regex("exclude_modules", cfg.exclude_modules)
    if isinstance(cfg.modules_to_save, str):
        cfg.modules_to_save = [cfg.modules_to_save]
    if cfg.modules_to_save is not None:
        cfg.modules_to_save = _names_or_regex("modules_to_save", cfg.modules_to_save) or None
    cfg.layers_to_transform = _layer_indices(cfg.layers_to_transform)
    if isinstance(cfg.layers_pattern, str):
        cfg.layers_pattern = cfg.layers_pattern or None
    elif cfg.layers_pattern is not None:
        cfg.layers_pattern = _names_or_regex("layers_pattern", list(cfg.layers_pattern)) or None
    if cfg.layers_pattern is not None and cfg.layers_to_transform is None:
        raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither (as peft)")
    if isinstance(cfg.target_modules, str) and cfg.layers_to_transform is not None:
        raise ConfigError(
            f"layers_to_transform cannot be used when target_modules is a regex string or 'all-linear' "
            f"({cfg.target_modules!r}); list the module names instead, e.g. ['q_proj', 'v_proj']"
        )
    cfg.rank_pattern = _pattern_dict("rank_pattern", cfg.rank_pattern, lambda k, v: _positive_int(k, v, label))
    cfg.alpha_pattern = _pattern_dict("alpha_pattern", cfg.alpha_pattern, _positive_number)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(key: str, v: Any, label: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{key} must be a positive integer (the {label} rank), got {v!r}")
    return v


def _positive_number(key: str, v: Any) -> float:
    if not _is_number(v) or v <= 0:
        raise ConfigError(f"{key} must be a positive number, got {v!r}")
    return v


def _pattern_dict(key: str, v: Any, check) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key} must be a dict {{module name pattern: value}}, got {type(v).__name__}")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{key} keys must be non-empty strings, got {k!r}")
        _check_regex(key, k)
        out[k] = check(f"{key}[{k!r}]", val)
    return out


def common_to_peft(model: nn.Module, cfg: Any, layers: list) -> dict[str, Any]:
    """The shared fields of adapter_config.json ('all-linear' written as the names it chose, as peft)."""
    targets = cfg.target_modules
    if targets == ALL_LINEAR:
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    return {
        "r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d, "target_modules": targets,
        "exclude_modules": cfg.exclude_modules, "init_weights": cfg.init_weights,
        "layers_to_transform": cfg.layers_to_transform, "layers_pattern": cfg.layers_pattern,
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "modules_to_save": cfg.modules_to_save,
    }  # fmt: skip


def finetune_kwargs(finetune) -> dict[str, Any]:
    """The shared config fields from a YAML finetune section: lora_rank -> r, lora_alpha -> alpha
    (empty: lora_rank, peft's default scale alpha / r = 1), lora_target, additional_target,
    rank_dropout, module_dropout. (A lora_dropout set with a LyCORIS method is refused before this
    runs, by train.methods.refuse_unread_keys: the method's `keys` do not list it.)"""
    from .peft_config import yaml_targets

    targets, extra = yaml_targets(finetune)
    alpha = finetune.lora_alpha if finetune.lora_alpha is not None else finetune.lora_rank
    return {"r": finetune.lora_rank, "alpha": alpha, "target_modules": targets, "modules_to_save": extra,
            "rank_dropout": finetune.rank_dropout, "module_dropout": finetune.module_dropout}


# ---- layer geometry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """An adapted layer's weight as a LyCORIS update sees it: `out` x `in_` (input channels per group
    for a convolution) x `kernel` (() for Linear)."""

    out: int
    in_: int
    kernel: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out, self.in_, *self.kernel)

    @property
    def pointwise(self) -> bool:
        """A Linear, or a convolution whose kernel is all ones (peft then uses the flat factors)."""
        return all(k == 1 for k in self.kernel)


def geometry(module: nn.Module) -> Geometry:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return Geometry(module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size))
    return Geometry(module.out_features, module.in_features)


def tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """FedPara's "Proposition 3" factor of a convolution weight: core t (r, r, k0, k1), w_a (r, out),
    w_b (r, in) -> (out, in, k0, k1), i.e. sum_ij t[i, j] w_a[i, p] w_b[j, q]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, w_b, w_a)


# ---- the layer --------------------------------------------------------------------------------
class LycorisLayer(AdapterLayer):
    """Mixin of LoHa's and LoKr's layer classes, placed before the base class. A method subclass
    sets `method_name`, `param_dicts` (peft's tensor names) and `label`, and implements
    `create(name, r, cfg, geo)` (make and initialise its tensors) and `update(name)` (the unscaled
    update in the method's own layout, fp32, with autograd)."""

    label = ""
    state_attrs = (
        "lyco_r", "lyco_alpha", "lyco_scaling", "lyco_rank_dropout", "lyco_rank_dropout_scale",
        "lyco_module_dropout", "lyco_active", "lyco_merged", "lyco_disabled", "_lyco_run", "_lyco_route",
    )  # fmt: skip
    base_class_attr = "_lyco_base_class"
    route_attr = "_lyco_route"
    _lyco_route = None  # set per instance by route_adapters (routing.py)
    rescale_rank_dropout = True  # LoHa always rescales kept rows; LoKr only with rank_dropout_scale

    # ---- life cycle ---------------------------------------------------------------------------
    def setup(self, base_class: type) -> None:
        self._lyco_base_class = base_class
        for attr in self.param_dicts:
            setattr(self, attr, nn.ParameterDict())
        self.lyco_r: dict[str, int] = {}
        self.lyco_alpha: dict[str, float] = {}
        self.lyco_scaling: dict[str, float] = {}
        self.lyco_rank_dropout: dict[str, float] = {}
        self.lyco_rank_dropout_scale: dict[str, bool] = {}
        self.lyco_module_dropout: dict[str, float] = {}
        self.lyco_active: tuple[str, ...] = ()
        self.lyco_merged: list[str] = []
        self.lyco_disabled = False
        self._lyco_run: tuple[str, ...] = ()

    def add_from_config(self, name: str, cfg: Any, path: str) -> None:
        device = self._device()
        if device.type == "meta":
            raise ConfigError(f"cannot add {self.label} to a module whose weight is on the meta device ({path})")
        r = pattern_value(cfg.rank_pattern, path, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, path, cfg.alpha)
        tensors = self.create(name, r, cfg, geometry(self))
        for attr, t in tensors.items():
            getattr(self, attr)[name] = nn.Parameter(t.to(device))
        self.lyco_r[name] = r
        self.lyco_alpha[name] = alpha
        self.lyco_scaling[name] = alpha / r
        self.lyco_rank_dropout[name] = cfg.rank_dropout
        self.lyco_rank_dropout_scale[name] = getattr(cfg, "rank_dropout_scale", self.rescale_rank_dropout)
        self.lyco_module_dropout[name] = cfg.module_dropout
        self._refresh()

    def create(self, name: str, r: int, cfg: Any, geo: Geometry) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _device(self) -> torch.device:
        for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)):
            return t.device
        return torch.device("cpu")

    def adapter_names(self) -> list[str]:
        return list(self.lyco_r)

    def shape_hint(self, name: str) -> str:
        return f"r={self.lyco_r[name]}"

    @property
    def adapters_disabled(self) -> bool:
        return self.lyco_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.lyco_disabled = flag

    def set_active(self, names) -> None:
        self.lyco_active = tuple(n for n in names if n in self.lyco_r)
        self._refresh()

    def _refresh(self) -> None:
        self._lyco_run = tuple(n for n in self.lyco_active if n not in self.lyco_merged)

    def delete_adapter(self, name: str) -> None:
        if name in self.lyco_merged:
            self.unmerge([name])
        for attr in self.param_dicts:
            d = getattr(self, attr)
            if name in d:
                del d[name]
        for d in (self.lyco_r, self.lyco_alpha, self.lyco_scaling, self.lyco_rank_dropout,
                  self.lyco_rank_dropout_scale, self.lyco_module_dropout):
            d.pop(name, None)
        self.lyco_active = tuple(n for n in self.lyco_active if n != name)
        self._refresh()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {attr: getattr(self, attr)[name] for attr in self.param_dicts if name in getattr(self, attr)}

    # ---- the update -----------------------------------------------------------------------------
    def delta_weight(self, name: str, rank_dropout: bool = False) -> torch.Tensor:
        """Adapter `name`'s update `update * alpha / r` shaped like the base weight (out, in[, *kernel]),
        fp32, with autograd; `rank_dropout` zeroes random output rows (training)."""
        delta = (self.update(name) * self.lyco_scaling[name]).reshape(geometry(self).shape)
        p = self.lyco_rank_dropout[name]
        if rank_dropout and p > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
            if self.lyco_rank_dropout_scale[name] and bool(keep.any()):
                keep = keep / keep.mean()
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        return delta

    def _lyco_op(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with weight `delta` and no bias."""
        if isinstance(self, (nn.Conv1d, nn.Conv2d)):
            return self._conv_forward(x, delta, None)
        return F.linear(x, delta)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        if self._lyco_route is not None and not self.lyco_disabled:
            return self._lyco_route.add_lora(self, x, out)
        if self.lyco_disabled or not self._lyco_run:
            return out
        return self.add_adapters(x, out, self._lyco_run)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`out` (the base output for `x`) plus each adapter's `op(x, delta)`: computed in the
        adapter's dtype (fp32) and cast back to x's dtype, as peft does."""
        result = out
        for name in names:
            p = self.lyco_module_dropout[name]
            if self.training and p > 0 and float(torch.rand(1)) <= p:
                continue  # module dropout: this adapter sits this step out
            delta = self.delta_weight(name, rank_dropout=self.training)
            h = x if x.dtype == delta.dtype else x.to(delta.dtype)
            result = result + self._lyco_op(h, delta)
        return result if result.dtype == x.dtype else result.to(x.dtype)

    # ---- merge ------------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.lyco_merged)

    def _merged(self, names: list[str], sign: float) -> torch.Tensor:
        new = self.weight.detach().float()
        for n in names:
            new = new + sign * self.delta_weight(n).detach().to(new.device)
        return new

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        todo = [n for n in names if n in self.lyco_r and n not in self.lyco_merged]
        return bool(torch.isfinite(self._merged(todo, 1.0)).all())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = [n for n in names if n in self.lyco_r and n not in self.lyco_merged]
        if not todo:
            return []
        new = self._merged(todo, 1.0)
        if safe_merge and not torch.isfinite(new).all():
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.weight")
        self.weight.copy_(new.to(self.weight.dtype))
        self.lyco_merged.extend(todo)
        self._refresh()
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in reversed(self.lyco_merged) if names is None or n in names]
        if not todo:
            return []
        self.weight.copy_(self._merged(todo, -1.0).to(self.weight.dtype))
        self.lyco_merged = [n for n in self.lyco_merged if n not in todo]
        self._refresh()
        return todo

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.lyco_r[n]}, scaling={self.lyco_scaling[n]:g}" for n in self.lyco_r]
        state = f", merged={self.lyco_merged}" if self.lyco_merged else ""
        return f"{super().extra_repr()}, {self.method_name}=[{'; '.join(parts)}]{state}"


class QuantLycoris:
    """Mixin for a LyCORIS layer over a quantized base (QuantLinear): trains as on an nn.Linear;
    merging is refused (the sum would have to be requantized)."""

    def cannot_merge(self) -> str | None:
        return self.merge_refusal()

