"""Which adapter layer class serves which base module type, per method.

`register_layer(nn.Linear, LoraLinear)` (method "lora" by default) is the one line a new layer
type needs; `register_method` (methods.py) makes these calls for a method's whole layer table.
Lookup is keyed by (method, base type), so a second method for nn.Linear does not evict LoRA:
it walks the method's registrations in order and takes the first whose base type the module is
an instance of. For a subclass of a registered base (e.g. a model's own `MyLinear(nn.Linear)`),
a combined class `LoraMyLinear(LoraLinear, MyLinear)` is made once, so the module keeps its
own forward.
"""

from __future__ import annotations

import sys

from torch import nn

# (method, base type, adapter class), in registration order
_LAYERS: list[tuple[str, type, type, str | None]] = []
_DERIVED: dict[tuple[type, type], type] = {}
DEFAULT_METHOD = "lora"


def register_layer(base_cls: type, adapter_cls: type, method: str = DEFAULT_METHOD, prefix: str | None = None) -> None:
    """Adapt modules of type `base_cls` (and subclasses) with `adapter_cls` (a subclass of it) for
    `method`. `prefix` names derived classes for subclasses of `base_cls` ('Lora' -> LoraMyLinear)."""
    if not issubclass(adapter_cls, base_cls):
        raise TypeError(f"{adapter_cls.__name__} must subclass {base_cls.__name__}")
    _LAYERS[:] = [e for e in _LAYERS if not (e[0] == method and e[1] is base_cls)]
    _LAYERS.append((method, base_cls, adapter_cls, prefix))


def _entries(method: str):
    return [e for e in _LAYERS if e[0] == method]


def supported_base_types(method: str = DEFAULT_METHOD) -> list[type]:
    return [b for _, b, _, _ in _entries(method)]


def adapter_class_for(module: nn.Module, method: str = DEFAULT_METHOD) -> type | None:
    """The class of `method` to swap a plain `module` to, or None when its type is not supported."""
    cls = type(module)
    for _, base_cls, adapter_cls, prefix in _entries(method):
        if cls is base_cls:
            return adapter_cls
        if issubclass(cls, base_cls):
            # the subclass's forward may save its output for backward: no in-place add
            name = prefix or method.capitalize()
            return derived_class(name, adapter_cls, cls, inplace_add=False)
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
