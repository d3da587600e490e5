"""(IA)^3 (Liu et al. 2022): a learned vector per adapted layer that rescales its output, or, for
the "feedforward" layers, its input. peft's `IA3Config` field names and maths.

    from tuneforge import IA3Config, add_adapter
    add_adapter(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))

A layer's vector is `<module>.ia3_l.<adapter>` (fp32, as peft's `ia3_l`): shape (out, 1) for an
output-scaling layer, (1, in) for a feedforward one; it starts at ones (the model is unchanged),
or random with `init_ia3_weights=False`. Several active adapters multiply. Merging multiplies the
weight (and an output-scaling layer's bias) in place; unmerging divides again (exactly, where
peft adds 1e-8 to the divisor). Files hold `base_model.model.<module>.ia3_l`, peft_type "IA3".
Layers: nn.Linear, transformers' Conv1D (GPT-2) and a quantized base (tuneforge.quant.QuantLinear,
`quantization_bit`), where both forms read the frozen codes unchanged and merging is refused
(`tuneforge.dequantize_model` first; `tuneforge export` does it).

`target_modules` / `feedforward_modules` left empty take peft's defaults for the model type
(Llama: k_proj, v_proj, down_proj, with down_proj feedforward). YAML: `finetuning_type: ia3`;
`lora_target` gives target_modules ('all': every linear layer but the output head) and
`additional_target` modules_to_save; feedforward modules are the model type's defaults.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError
from tuneforge.quant.linear import QuantLinear

from .config import ALL_LINEAR, _names_or_regex
from .layer import AdapterLayer, Conv1D
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields, yaml_targets
from .targets import candidate_modules, minimal_suffixes, resolve_targets

# peft's defaults per model type: (target_modules, feedforward_modules)
DEFAULTS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
}
FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
          "init_ia3_weights")  # fmt: skip


@dataclass
class IA3Config:
    """Settings of one (IA)^3 adapter; names, meanings and defaults follow peft's `IA3Config`."""

    target_modules: list[str] | str | None = None
    """Module names or suffixes, a regex (full match), or 'all-linear'; empty: peft's default for the model type."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    feedforward_modules: list[str] | str | None = None
    """Adapted modules whose input (not output) is rescaled; a subset of target_modules. Empty: the
    model type's default."""
    fan_in_fan_out: bool = False
    """True when the base layer stores its weight as (in, out) (Conv1D); decided per layer from its type."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter."""
    init_ia3_weights: bool = True
    """True: the vectors start at ones (the adapter starts as a no-op); False: random (for tests)."""
    layers_to_transform = None  # peft's IA3 has no layer selection; target matching reads these
    layers_pattern = None

    def __post_init__(self) -> None:
        for key in ("target_modules", "exclude_modules", "feedforward_modules"):
            setattr(self, key, _names_or_regex(key, getattr(self, key)))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None
        for key in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ConfigError(
                f"feedforward_modules {sorted(set(ff) - set(targets))} are not in target_modules {targets}; "
                "feedforward_modules must be a subset of target_modules (as in peft)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class IA3Layer(AdapterLayer):
    """Mixin placed before the base class (`class IA3Linear(IA3Layer, nn.Linear)`)."""

    method_name = "ia3"
    param_dicts = ("ia3_l",)
    state_attrs = ("ia3_feedforward", "ia3_active", "ia3_merged", "ia3_disabled", "_ia3_run", "_ia3_route")
    base_class_attr = "_ia3_base_class"
    route_attr = "_ia3_route"
    fan_in_fan_out = False
    _ia3_route = None

    ia3_l: nn.ParameterDict

    def setup(self, base_class: type) -> None:
        self._ia3_base_class = base_class
        self.ia3_l = nn.ParameterDict()
        self.ia3_feedforward: dict[str, bool] = {}
        self.ia3_active: tuple[str, ...] = ()
        self.ia3_merged: list[str] = []
        self.ia3_disabled = False
        self._ia3_run: tuple[str, ...] = ()

    def _base_device(self) -> torch.device:
        """The device of the base layer's own tensors (a Linear's weight, a QuantLinear's codes)."""
        for t in (*self._parameters.values(), *self._buffers.values()):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def in_out_features(self) -> tuple[int, int]:
        w = self.weight
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def add_from_config(self, name: str, cfg: IA3Config, path: str) -> None:
        device = self._base_device()
        if device.type == "meta":
            raise ConfigError(f"cannot add IA3 to a module whose weight is on the meta device ({path})")
        ff = _is_feedforward(cfg, path)
        in_f, out_f = self.in_out_features()
        vec = torch.randn((1, in_f) if ff else (out_f, 1))  # peft draws it even when it sets ones
        if cfg.init_ia3_weights:
            nn.init.constant_(vec, 1.0)
        self.ia3_l[name] = nn.Parameter(vec.to(device))
        self.ia3_feedforward[name] = ff
        self._refresh()

    def shape_hint(self, name: str) -> str:
        return "feedforward (scales the input)" if self.ia3_feedforward[name] else "scales the output"

    @property
    def adapters_disabled(self) -> bool:
        return self.ia3_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.ia3_disabled = flag

    def set_active(self, names) -> None:
        self.ia3_active = tuple(n for n in names if n in self.ia3_l)
        self._refresh()

    def _refresh(self) -> None:
        self._ia3_run = tuple(n for n in self.ia3_active if n not in self.ia3_merged)

    def delete_adapter(self, name: str) -> None:
        if name in self.ia3_merged:
            self.unmerge([name])
        del self.ia3_l[name]
        self.ia3_feedforward.pop(name, None)
        self.ia3_active = tuple(n for n in self.ia3_active if n != name)
        self._refresh()

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    # ---- merge -----------------------------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.ia3_merged)

    def _factor(self, name: str) -> torch.Tensor:
        """The vector laid out to multiply `weight` (Conv1D stores it (in, out))."""
        v = self.ia3_l[name].detach()
        return v.T if self.fan_in_fan_out else v

    def _scaled(self, names: list[str], undo: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight.detach()
        b = self.bias.detach() if self.bias is not None else None
        for n in names:
            f = self._factor(n).to(w.device)
            w = w / f if undo else w * f
            if b is not None and not self.ia3_feedforward[n]:
                s = self.ia3_l[n].detach().reshape(b.shape).to(b.device)
                b = b / s if undo else b * s
        return w, b

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        todo = [n for n in names if n in self.ia3_l and n not in self.ia3_merged]
        w, b = self._scaled(todo)
        return bool(torch.isfinite(w).all()) and (b is None or bool(torch.isfinite(b).all()))

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = [n for n in names if n in self.ia3_l and n not in self.ia3_merged]
        if not todo:
            return []
        w, b = self._scaled(todo)
        if safe_merge and not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
            raise ModelError(f"merging adapters {todo} would put NaN/inf into {self._get_name()}.weight")
        self._write(w, b)
        self.ia3_merged.extend(todo)
        self._refresh()
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in reversed(self.ia3_merged) if names is None or n in names]
        if not todo:
            return []
        self._write(*self._scaled(todo, undo=True))
        self.ia3_merged = [n for n in self.ia3_merged if n not in todo]
        self._refresh()
        return todo

    def _write(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        self.weight.copy_(w.to(self.weight.dtype))
        if b is not None:
            self.bias.copy_(b.to(self.bias.dtype))

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._ia3_route is not None and not self.ia3_disabled:
            # rows without an adapter keep the base output; feedforward rows are run again
            return self._ia3_route.add_lora(self, x, super().forward(x, *args, **kwargs))
        if self.ia3_disabled or not self._ia3_run:
            return super().forward(x, *args, **kwargs)
        return self._run(x, None, self._ia3_run, args, kwargs)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The output with adapters `names` applied (`out`: the base output; a feedforward adapter reruns
        the base on the scaled input)."""
        return self._run(x, out, names, (), {})

    def _run(self, x, out, names, args, kwargs) -> torch.Tensor:
        """peft's order: the input (feedforward) or output scaled in the vector's dtype, cast back."""
        ff = [self.ia3_l[n] for n in names if self.ia3_feedforward[n]]
        rest = [self.ia3_l[n] for n in names if not self.ia3_feedforward[n]]
        if ff:
            scale = _product(ff)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
            out = None
        if out is None:
            out = super().forward(x, *args, **kwargs)
        if rest:
            out = (out * _product(rest)).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        parts = [f"{n}: {'feedforward' if self.ia3_feedforward[n] else 'output'}" for n in self.ia3_l]
        return f"{super().extra_repr()}, ia3=[{'; '.join(parts)}]"


def _product(vectors: list[torch.Tensor]) -> torch.Tensor:
    scale = vectors[0].flatten()
    for v in vectors[1:]:
        scale = scale * v.flatten()
    return scale


class IA3Linear(IA3Layer, nn.Linear):
    """`nn.Linear` with IA3 adapters."""


class IA3QuantLinear(IA3Layer, QuantLinear):
    """IA3 over a quantized base (`tuneforge.quant.QuantLinear`, 4-bit NF4/FP4 or int8).

    Both forms only read the base layer: `y = base(x) * l` (l: (out, 1)) and, for a feedforward
    layer, `y = base(x * l)` (l: (1, in)), so they compute over the frozen codes exactly what they
    compute over the dequantized nn.Linear; only the vectors train. Merging is refused
    (`cannot_merge`): the scaled weight would have to be requantized; dequantize first.
    """

    def in_out_features(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def cannot_merge(self) -> str | None:
        return self.merge_refusal()


if Conv1D is not None:

    class IA3Conv1D(IA3Layer, Conv1D):
        """transformers' `Conv1D` (GPT-2): weight stored as (in, out), hence fan_in_fan_out."""

        fan_in_fan_out = True

else:  # pragma: no cover - transformers is a hard dependency of tuneforge
    IA3Conv1D = None  # type: ignore[assignment,misc]


def _is_feedforward(cfg: IA3Config, path: str) -> bool:
    """peft's rule: a regex matches the whole name; a list entry matches the end of the name."""
    ff = cfg.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(key) for key in ff or ())


def _resolve_targets(model: nn.Module, cfg: IA3Config) -> list[tuple[str, nn.Module]]:
    """peft's defaults for an empty target_modules / feedforward_modules, written into `cfg`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = DEFAULTS.get(model_type)
    if cfg.target_modules is None:
        if default is None:
            raise ConfigError(
                f"IA3 has no default target_modules for model type {model_type!r}; set target_modules "
                "(and feedforward_modules) to the module names to adapt"
            )
        cfg.target_modules = list(default[0])
    if cfg.feedforward_modules is None:
        cfg.feedforward_modules = list(default[1]) if default else []
    return resolve_targets(model, cfg)


def _to_peft(model: nn.Module, name: str, cfg: IA3Config, layers: list) -> dict[str, Any]:
    targets = cfg.target_modules
    if targets == ALL_LINEAR:  # write the resolved names, as peft does
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    return {
        "target_modules": targets,
        "exclude_modules": cfg.exclude_modules,
        "feedforward_modules": cfg.feedforward_modules,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "modules_to_save": cfg.modules_to_save,
        "init_ia3_weights": cfg.init_ia3_weights,
    }


def _from_peft(raw: dict[str, Any], source: str) -> IA3Config:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(IA3Config, raw, FIELDS, source)


def _from_finetune_args(finetune) -> IA3Config:
    targets, extra = yaml_targets(finetune)
    return IA3Config(target_modules=targets, modules_to_save=extra)


register_method(AdapterMethod(
    name="ia3", peft_type="IA3", label="IA3", prefix="IA3", config_class=IA3Config, layer_class=IA3Layer,
    layers={nn.Linear: IA3Linear, Conv1D: IA3Conv1D, QuantLinear: IA3QuantLinear}, resolve_targets=_resolve_targets,
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_target", "additional_target"),
))  # fmt: skip
