"""The adapter-layer protocol: what generic code may ask of an adapted layer, whatever its method.

An adapted layer is the base module itself with its class swapped to `<Method><Base>(MethodMixin,
Base)`; the mixin derives from `AdapterLayer`. The life-cycle code (core.py: add, activate,
disable, delete, merge, unload; peft_format.py: save / load; routing.py; quantization carry-over)
talks to these methods only and never names a method's tensors:

    adapter_names()            names of the adapters this layer carries
    adapter_parameters(name)   {attribute: Parameter} of adapter `name` (trainability, dtype, tools)
    peft_tensors(name)         {peft key suffix: tensor} of adapter `name`, as peft files name them
    file_tensors(name)         what save_adapter writes for it (default: peft_tensors; a layer whose
                               file holds a transform of its parameters, e.g. a LoRA ensemble, differs)
    add_from_config(name, cfg, path[, shared])   inject adapter `name` as `cfg` says for the module at
                               `path` (`shared`: what the method's `shared` hook made for the adapter)
    check_config(module, path, cfg)    (classmethod) refuse a target before any module changes
    delete_adapter(name)       remove one adapter (unmerging it first)
    release_adapter(name)      the adapter is dropped unmerged: give back what its init took
    set_active(names) / adapters_disabled   which adapters run; all off inside disable_adapters
    merged_adapters()          names merged into the base weight, oldest first
    merge(names, safe_merge) / unmerge(names) / merge_is_finite(names) / cannot_merge()
    add_adapters(x, out, names)   `out` (the base output for input `x`) with adapters `names` applied
    strip()                    remove every adapter: the module becomes its base class again
    carry_onto(new_base)       the same adapters over a rebuilt base layer (quantized / dequantized)
    fp32_parameters()          parameters a dtype cast of the base must leave alone

`carry_onto` / `fp32_parameters` / `adapter_names` are also the (duck-typed) names tuneforge.quant
uses; it imports nothing from this package.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .registry import adapter_class_for


class AdapterLayer:
    """Mixin base of every method's layer classes (placed before the base class)."""

    method_name: str = ""  # the AdapterMethod's name (set by each method's mixin)
    param_dicts: tuple[str, ...] = ()  # nn.ParameterDict attributes keyed by adapter name
    extra_children: tuple[str, ...] = ()  # other child modules the method adds (no adapter parameters,
    # e.g. VeRA's shared projections): never targets, removed by strip, kept by carry_onto
    state_attrs: tuple[str, ...] = ()  # per-instance attributes the method adds (removed by strip)
    base_class_attr = "_adapter_base_class"
    route_attr = "_route"  # attribute route_adapters (routing.py) sets per instance while routing
    peft_keys_at_root = False  # True: peft_tensors' keys are whole file keys (no 'base_model.model.<path>.')

    # ---- what every method provides --------------------------------------------------------
    @classmethod
    def check_config(cls, module: nn.Module, path: str, cfg: Any) -> None:
        """Raise ConfigError when `module` cannot take an adapter of `cfg` (nothing is changed yet)."""

    def add_from_config(self, name: str, cfg: Any, path: str) -> None:
        raise NotImplementedError

    def setup(self, base_class: type) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def set_active(self, names: tuple[str, ...] | list[str]) -> None:
        raise NotImplementedError

    def add_adapters(self, x: torch.Tensor, out: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        raise NotImplementedError

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- generic defaults --------------------------------------------------------------------
    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """{peft key suffix: tensor} that save_adapter writes for adapter `name`. Default: `peft_tensors`
        (which load_adapter also fills in place); override where the file holds a transform of the
        parameters (a LoRA ensemble writes the plain LoRA it equals)."""
        return self.peft_tensors(name)

    def shape_hint(self, name: str) -> str:
        """A few words on adapter `name`'s shape for messages about files that do not fit (e.g. 'r=8')."""
        return ""

    @property
    def base_class(self) -> type:
        return self.__dict__[self.base_class_attr]

    def adapter_names(self) -> list[str]:
        first = getattr(self, self.param_dicts[0])
        return list(first.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        out = {}
        for attr in self.param_dicts:
            d = getattr(self, attr)
            if name in d:
                out[attr] = d[name]
        return out

    def fp32_parameters(self) -> list[nn.Parameter]:
        return [p for attr in self.param_dicts for p in getattr(self, attr).values()]

    def release_adapter(self, name: str) -> None:
        """Called for each adapter that `unload(merge=False)` drops; nothing to give back by default."""

    def merged_adapters(self) -> list[str]:
        return []

    def cannot_merge(self) -> str | None:
        return None

    def merge(self, names: list[str], safe_merge: bool = False) -> list[str]:
        raise ConfigError(f"{type(self).__name__} adapters cannot be merged")

    def unmerge(self, names: list[str] | None = None) -> list[str]:
        return []

    def merge_is_finite(self, names: list[str]) -> bool:
        return True

    def strip(self) -> None:
        """Remove every adapter and turn the module back into its base class (weights untouched)."""
        for attr in (*self.param_dicts, *self.extra_children):
            self._modules.pop(attr, None)
        base = self.base_class
        for attr in (*self.state_attrs, self.base_class_attr):
            self.__dict__.pop(attr, None)
        self.__class__ = base

    def carry_onto(self, new_base: nn.Module) -> nn.Module:
        """`new_base` (a rebuilt base layer, e.g. quantized) turned into this layer: same adapters, state."""
        if self.merged_adapters():
            raise ConfigError("unmerge the adapters before quantizing: merged weights cannot be quantized back")
        cls = adapter_class_for(new_base, self.method_name)
        if cls is None:
            raise ConfigError(f"{self.method_name} has no layer for {type(new_base).__name__}")
        base_cls = type(new_base)
        new_base.__class__ = cls
        for key, value in vars(self).items():
            if key not in ("_parameters", "_buffers", "_modules", "training") and key not in vars(new_base):
                setattr(new_base, key, value)
        for key in (*self.param_dicts, *self.extra_children):
            new_base._modules[key] = self._modules[key]
        new_base.__dict__[self.base_class_attr] = base_cls
        new_base.on_new_base()
        return new_base

    def on_new_base(self) -> None:
        """Hook after `carry_onto`: drop whatever was cached from the old base weight."""


def rebind_hooked_forward(module: nn.Module) -> None:
    """accelerate's hooks keep the original bound forward in `_old_forward`; point it at the new class."""
    if "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(type(module).forward, module)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency of tuneforge
        return None
    return Conv1D


Conv1D = _conv1d_class()  # transformers' GPT-2 style layer, weight stored (in, out)
