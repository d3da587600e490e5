"""`modules_to_save`: modules trained in full, one trainable copy per adapter.

The module keeps its own (frozen) parameters under its own names; its class is swapped to a
subclass whose forward calls the active adapter's copy, stored beside them as
`<module>.modules_to_save.<adapter>` (peft's in-memory name). Disabling the adapters or
activating an adapter without a copy runs the original; `unload(merge=True)` copies the trained
values into the original parameters.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .registry import derived_class

_STATE_ATTRS = ("mts_active", "mts_disabled", "_mts_base_class", "_mts_route")


class ModulesToSave:
    """Mixin placed before the module's own class."""

    modules_to_save: nn.ModuleDict
    _mts_route = None  # set per instance by route_adapters (routing.py): one adapter per sample

    def mts_setup(self, base_class: type) -> None:
        self._mts_base_class = base_class
        self.modules_to_save = nn.ModuleDict()
        self.mts_active: str | None = None
        self.mts_disabled = False

    def add_copy(self, name: str) -> nn.Module:
        twin = plain_copy(self)
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in twin.parameters()):
            twin.float()  # trained weights are fp32 on a half-precision base, like LoRA's
        twin.requires_grad_(True)
        self.modules_to_save[name] = twin
        return twin

    def delete_copy(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.mts_active == name:
            self.mts_active = None

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def set_active(self, names: tuple[str, ...] | list[str]) -> None:
        owners = [n for n in names if n in self.modules_to_save]
        self.mts_active = owners[0] if owners else None

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """The original module's parameters and buffers, by name relative to the module."""
        out = {}
        for n, t in list(self.named_parameters()) + list(self.named_buffers()):
            if not n.startswith("modules_to_save."):
                out[n] = t
        return out

    @torch.no_grad()
    def write_back(self, name: str) -> None:
        """Copy adapter `name`'s trained values into the original parameters (for unload/merge)."""
        twin = self.modules_to_save[name]
        twin_tensors = dict(twin.named_parameters()) | dict(twin.named_buffers())
        for n, t in self.own_tensors().items():
            t.copy_(twin_tensors[n].to(t.dtype))

    def strip(self) -> None:
        del self.modules_to_save
        base = self._mts_base_class
        for attr in _STATE_ATTRS:
            self.__dict__.pop(attr, None)
        self.__class__ = base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._mts_route is not None and not self.mts_disabled:
            return self._mts_route.run_saved(self, args, kwargs)
        if self.mts_active is not None and not self.mts_disabled:
            return self._run_copy(self.modules_to_save[self.mts_active], args, kwargs)
        return super().forward(*args, **kwargs)

    def _run_copy(self, twin: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Run the copy in its own dtype; hand the result back in the dtype the original gives."""
        mine = next((t for t in self.own_tensors().values() if t.is_floating_point()), None)
        theirs = next((p for p in twin.parameters() if p.is_floating_point()), None)
        if mine is None or theirs is None or mine.dtype == theirs.dtype:
            return twin(*args, **kwargs)

        def cast(v):
            return v.to(theirs.dtype) if torch.is_tensor(v) and v.is_floating_point() else v

        out = twin(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})
        return out.to(mine.dtype) if torch.is_tensor(out) and out.is_floating_point() else out


def plain_copy(module: nn.Module) -> nn.Module:
    """Deep copy of `module` as its original class, without the copies of other adapters."""
    if not isinstance(module, ModulesToSave):
        return copy.deepcopy(module)
    saved = module._modules.pop("modules_to_save")
    state = {k: module.__dict__.pop(k) for k in _STATE_ATTRS if k in module.__dict__}
    cls = module.__class__
    try:
        module.__class__ = state["_mts_base_class"]
        return copy.deepcopy(module)
    finally:
        module.__class__ = cls
        module.__dict__.update(state)
        module._modules["modules_to_save"] = saved


def make_modules_to_save(module: nn.Module, module_name: str, model: nn.Module) -> ModulesToSave:
    """Swap `module` to its ModulesToSave class (once); warns when it shares weights (tied head)."""
    if isinstance(module, ModulesToSave):
        return module
    own = {id(p) for p in module.parameters()}
    for other_name, other in model.named_modules():
        if other_name == module_name or other_name.startswith(module_name + "."):
            continue
        if any(id(p) in own for p in other.parameters(recurse=False)):
            warnings.warn(
                f"modules_to_save: {module_name} shares a weight with {other_name} (tied embeddings); "
                f"the trained copy is untied, and unload(merge=True) writes it into both",
                stacklevel=3,
            )
            break
    base = type(module)
    module.__class__ = derived_class("ModulesToSave", ModulesToSave, base)
    module.mts_setup(base)
    return module
