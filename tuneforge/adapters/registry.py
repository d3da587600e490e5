"""Which adapter layer class serves which base module type.

`register_layer(nn.Linear, LoraLinear)` is the one line a new layer type needs. Lookup walks the
registrations in order and takes the first whose base type the module is an instance of. For a
subclass of a registered base (e.g. a model's own `MyLinear(nn.Linear)`), a combined class
`LoraMyLinear(LoraLinear, MyLinear)` is made once, so the module keeps its own forward.
"""

from __future__ import annotations

import sys

from torch import nn

_LAYERS: list[tuple[type, type]] = []
_DERIVED: dict[tuple[type, type], type] = {}


def register_layer(base_cls: type, adapter_cls: type) -> None:
    """Adapt modules of type `base_cls` (and subclasses) with `adapter_cls` (a subclass of it)."""
    if not issubclass(adapter_cls, base_cls):
        raise TypeError(f"{adapter_cls.__name__} must subclass {base_cls.__name__}")
    _LAYERS[:] = [(b, a) for b, a in _LAYERS if b is not base_cls]
    _LAYERS.append((base_cls, adapter_cls))


def supported_base_types() -> list[type]:
    return [b for b, _ in _LAYERS]


def adapter_class_for(module: nn.Module) -> type | None:
    """The adapter class to swap a plain `module` to, or None when its type is not supported."""
    cls = type(module)
    for base_cls, adapter_cls in _LAYERS:
        if cls is base_cls:
            return adapter_cls
        if issubclass(cls, base_cls):
            # the subclass's forward may save its output for backward: no in-place add
            return derived_class("Lora", adapter_cls, cls, inplace_add=False)
    return None


def derived_class(prefix: str, mixin_cls: type, base_cls: type, **attrs) -> type:
    """`class <prefix><Base>(mixin_cls, base_cls)`, made once, findable by pickle in this process."""
    key = (mixin_cls, base_cls)
    if key not in _DERIVED:
        name = f"{prefix}{base_cls.__name__}"
        new = type(name, (mixin_cls, base_cls), {"__module__": __name__, **attrs})
        module = sys.modules[__name__]
        qual, i = name, 1
        while hasattr(module, qual):
            i += 1
            qual = f"{name}_{i}"
        new.__qualname__ = qual
        setattr(module, qual, new)
        _DERIVED[key] = new
    return _DERIVED[key]
