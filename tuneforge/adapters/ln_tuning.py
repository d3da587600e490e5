"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning"): only the normalisation layers train. peft's `LNTuningConfig` ("LN_TUNING") fields,
file layout and defaults.

    from tuneforge import LNTuningConfig, add_adapter
    add_adapter(model, LNTuningConfig())       # Llama: input_layernorm, post_attention_layernorm, norm

Each adapted norm layer keeps its own (frozen) parameters; every adapter gets a trainable copy of
the layer, `<module>.ln_tuning_layers.<adapter>` (an nn.ModuleDict, peft's name), so adapters
switch and disabling them gives the base model back. The copy is fp32 on a half-precision base
(input cast to it, output cast back). One layer runs one adapter at a time (as in peft): two
active LN-tuning adapters on the same layer raise ConfigError at forward. Merging copies the
adapter's parameters into the layer's own (one adapter per layer); unmerging puts the originals
back. Files hold `base_model.model.<module>.ln_tuning_layers.<param>` (e.g. `.weight`, `.bias`).

Targets: `target_modules` names (suffix match) or a regex; empty takes peft's default for the
model type (Llama / Mistral / Gemma: input_layernorm, post_attention_layernorm, norm; Qwen2:
post_attention_layernorm; GPT-2: ln_1, ln_2, ln_f). Any leaf module with parameters can be
targeted (peft allows that too), normally the norms (LayerNorm, RMSNorm). YAML:
`finetuning_type: ln_tuning`; `lora_target` 'all' takes the model type's default, a comma list
names the modules; `additional_target` gives modules_to_save.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .config import ALL_LINEAR, _names_or_regex
from .layer import AdapterLayer
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, split_names, warn_unknown_fields
from .targets import resolve_targets

# peft's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING (the text-model entries)
DEFAULTS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
}  # fmt: skip
FIELDS = ("target_modules", "exclude_modules", "modules_to_save")


@dataclass
class LNTuningConfig:
    """Settings of one LN-tuning adapter; names, meanings and defaults follow peft's `LNTuningConfig`."""

    target_modules: list[str] | str | None = None
    """Norm modules to tune: names or suffixes, or a regex (full match); empty: peft's default for the model type."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    modules_to_save: list[str] | None = None
    """Modules (name suffixes) trained in full and saved with the adapter (e.g. a classifier head)."""
    layers_to_transform = None  # peft's LN tuning has no layer selection; target matching reads these
    layers_pattern = None

    def __post_init__(self) -> None:
        for key in ("target_modules", "exclude_modules"):
            setattr(self, key, _names_or_regex(key, getattr(self, key)))
        if self.target_modules == ALL_LINEAR:
            raise ConfigError(
                "LN tuning tunes norm layers, so target_modules 'all-linear' does not apply; name the norm "
                "modules (e.g. ['input_layernorm', 'post_attention_layernorm']) or leave it empty for the "
                "model type's default"
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save) or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LNTuningLayer(AdapterLayer):
    """Mixin placed before the base class (`class LNTuningLayerNorm(LNTuningLayer, nn.LayerNorm)`)."""

    method_name = "ln_tuning"
    param_dicts = ("ln_tuning_layers",)  # an nn.ModuleDict: one trainable copy of the layer per adapter
    state_attrs = ("ln_tuning_active", "ln_tuning_merged", "ln_tuning_original", "ln_tuning_disabled",
                   "ln_tuning_path", "_ln_tuning_route")  # fmt: skip
    base_class_attr = "_ln_tuning_base_class"
    route_attr = "_ln_tuning_route"
    _ln_tuning_route = None

    ln_tuning_layers: nn.ModuleDict

    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg: Any) -> None:
        if isinstance(module, LNTuningLayer):
            return
        if next(module.children(), None) is not None:
            raise ConfigError(
                f"LN tuning target {path} is a {type(module).__name__} holding other modules; target the "
                "norm layers themselves (e.g. input_layernorm), not a block"
            )
        if not any(p.is_floating_point() for p in module.parameters()):
            raise ConfigError(f"LN tuning target {path} ({type(module).__name__}) has no parameters to tune")
        if any(p.device.type == "meta" for p in module.parameters()):
            raise ConfigError(f"cannot add LN tuning to a module whose weights are on the meta device ({path})")

    def setup(self, base_class: type) -> None:
        self._ln_tuning_base_class = base_class
        self.ln_tuning_layers = nn.ModuleDict()
        self.ln_tuning_active: tuple[str, ...] = ()
        self.ln_tuning_merged: list[str] = []
        self.ln_tuning_original: dict[str, torch.Tensor] = {}
        self.ln_tuning_disabled = False
        self.ln_tuning_path = ""

    def add_from_config(self, name: str, cfg: LNTuningConfig, path: str) -> None:
        twin = self._plain_copy()
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in twin.parameters()):
            twin.float()  # trained copies are fp32 on a half-precision base, like LoRA's matrices
        self.ln_tuning_layers[name] = twin
        self.ln_tuning_path = path

    def _plain_copy(self) -> nn.Module:
        """A deep copy of the layer as its base class, without the adapters' copies."""
        saved = self._modules.pop("ln_tuning_layers")
        state = {k: self.__dict__.pop(k) for k in (*self.state_attrs, self.base_class_attr) if k in self.__dict__}
        cls = self.__class__
        try:
            self.__class__ = state[self.base_class_attr]
            return copy.deepcopy(self)
        finally:
            self.__class__ = cls
            self.__dict__.update(state)
            self._modules["ln_tuning_layers"] = saved

    # ---- the protocol ----------------------------------------------------------------------------
    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self.ln_tuning_layers:
            return {}
        return {f"ln_tuning_layers.{k}": p for k, p in self.ln_tuning_layers[name].named_parameters()}

    def fp32_parameters(self) -> list[nn.Parameter]:
        return list(self.ln_tuning_layers.parameters())

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        twin = self.ln_tuning_layers[name]
        return {f"ln_tuning_layers.{k}": t for k, t in twin.state_dict(keep_vars=True).items()}

    @property
    def adapters_disabled(self) -> bool:
        return self.ln_tuning_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, flag: bool) -> None:
        self.ln_tuning_disabled = flag

    def set_active(self, names) -> None:
        self.ln_tuning_active = tuple(n for n in names if n in self.ln_tuning_layers)

    def delete_adapter(self, name: str) -> None:
        if name in self.ln_tuning_merged:
            self.unmerge([name])
        del self.ln_tuning_layers[name]
        self.ln_tuning_active = tuple(n for n in self.ln_tuning_active if n != name)

    # ---- merge: the adapter's parameters replace the layer's own ----------------------------------
    def merged_adapters(self) -> list[str]:
        return list(self.ln_tuning_merged)

    def _own(self) -> dict[str, torch.Tensor]:
        return {k: t for k, t in self.state_dict(keep_vars=True).items() if not k.startswith("ln_tuning_layers.")}

    @torch.no_grad()
    def merge_is_finite(self, names: list[str]) -> bool:
        todo = [n for n in names if n in self.ln_tuning_layers and n not in self.ln_tuning_merged]
        return all(bool(torch.isfinite(p).all()) for n in todo for p in self.ln_tuning_layers[n].parameters())

    @torch.no_grad()
    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        todo = [n for n in names if n in self.ln_tuning_layers and n not in self.ln_tuning_merged]
        if not todo:
            return []
        if len(todo) + len(self.ln_tuning_merged) > 1:
            raise ConfigError(
                f"{self.ln_tuning_path}: LN tuning merges one adapter per layer (each replaces the norm's "
                f"parameters); merge {todo[0]!r} alone, or unmerge_adapters(model) first"
            )
        if safe_merge and not self.merge_is_finite(todo):
            raise ConfigError(f"merging adapter {todo[0]!r} would put NaN/inf into {self.ln_tuning_path}")
        own = self._own()
        twin = self.ln_tuning_layers[todo[0]].state_dict()
        self.ln_tuning_original = {k: t.detach().clone() for k, t in own.items()}
        for k, t in own.items():
            t.copy_(twin[k].to(t.dtype))
        self.ln_tuning_merged.append(todo[0])
        return todo

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> list[str]:
        todo = [n for n in self.ln_tuning_merged if names is None or n in names]
        if not todo:
            return []
        for k, t in self._own().items():
            t.copy_(self.ln_tuning_original[k])
        self.ln_tuning_original = {}
        self.ln_tuning_merged = []
        return todo

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._ln_tuning_route is not None and not self.ln_tuning_disabled:
            return self._ln_tuning_route.add_lora(self, x, super().forward(x, *args, **kwargs))
        run = [n for n in self.ln_tuning_active if n not in self.ln_tuning_merged]
        if self.ln_tuning_disabled or not run or self.ln_tuning_merged:
            return super().forward(x, *args, **kwargs)
        if len(run) > 1:
            raise ConfigError(
                f"{self.ln_tuning_path} has {len(run)} active LN-tuning adapters {list(run)}; LN tuning runs one "
                "adapter per layer at a time: activate one of them (set_active_adapters)"
            )
        return self._run_copy(run[0], x, args, kwargs)

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """The layer's output with adapter `names[0]`: its copy of the layer run on `x` (`out` is unused)."""
        return self._run_copy(names[0], x, (), {})

    def _run_copy(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        twin = self.ln_tuning_layers[name]
        p = next(twin.parameters())
        if p.dtype == x.dtype or not x.is_floating_point():
            return twin(x, *args, **kwargs)
        return twin(x.to(p.dtype), *args, **kwargs).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ln_tuning=[{', '.join(self.ln_tuning_layers)}]"


class LNTuningModule(LNTuningLayer, nn.Module):
    """Any leaf module with parameters (LayerNorm, RMSNorm, ...); each type gets a derived class
    (`LNTuningLayerNorm`, `LNTuningLlamaRMSNorm`) that keeps the type's own forward."""


def _resolve_targets(model: nn.Module, cfg: LNTuningConfig) -> list[tuple[str, nn.Module]]:
    """peft's default norm modules for an empty target_modules, written into `cfg`."""
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ConfigError(
                f"LN tuning has no default target_modules for model type {model_type!r}; set target_modules "
                "to the norm modules to tune (e.g. ['LayerNorm'] for BERT)"
            )
        cfg.target_modules = list(DEFAULTS[model_type])
    return resolve_targets(model, cfg)


def _to_peft(model: nn.Module, name: str, cfg: LNTuningConfig, layers: list) -> dict[str, Any]:
    return {"target_modules": cfg.target_modules, "exclude_modules": cfg.exclude_modules,
            "modules_to_save": cfg.modules_to_save}


def _from_peft(raw: dict[str, Any], source: str) -> LNTuningConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(LNTuningConfig, raw, FIELDS, source)


def _from_finetune_args(finetune) -> LNTuningConfig:
    target = finetune.lora_target.strip()
    targets = None if target in ("all", "all-linear", "") else split_names(target)
    return LNTuningConfig(target_modules=targets, modules_to_save=split_names(finetune.additional_target) or None)


register_method(AdapterMethod(
    name="ln_tuning", peft_type="LN_TUNING", label="LN tuning", prefix="LNTuning", config_class=LNTuningConfig,
    layer_class=LNTuningLayer, layers={nn.Module: LNTuningModule}, resolve_targets=_resolve_targets,
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    keys=("lora_target", "additional_target"),
))  # fmt: skip
