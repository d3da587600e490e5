"""tuneforge's adapter engine: LoRA (and other methods) on any `torch.nn.Module`, peft-compatible files.

    from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...train...
    save_adapter(model, "out/adapter")          # loads in peft / transformers / vLLM

Adapted modules keep their own parameter names (`q_proj.weight`); adapter tensors sit beside
them (`q_proj.lora_A.default`). peft's key layout exists only in `peft_format.py`.

Methods: each registers itself (`register_method(AdapterMethod(...))`, methods.py) at the bottom
of its own file; tuneforge/adapter_methods.py lists those files (one line per method) and they are
imported below. Generic code talks to the adapter-layer protocol (layer.py).
"""

from importlib import import_module

from tuneforge.adapter_methods import METHODS

from .combine import combine_adapters
from .config import LoraConfig
from .core import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge_adapters,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from .layer import AdapterLayer
from .lora import LoraLayer
from .lora_conv2d import LoraConv2d
from .lora_embedding import LoraEmbedding
from .methods import AdapterMethod, all_methods, method_named, method_names, register_method
from .peft_format import load_adapter, save_adapter
from .registry import register_layer
from .routing import route_adapters

for _module, _help in METHODS.values():
    import_module(f"{__name__}.{_module}")  # its last statement registers the method


def __getattr__(name: str):
    """Every registered method's config class by its name (`from tuneforge.adapters import IA3Config`)."""
    for method in all_methods():
        if method.config_class.__name__ == name:
            return method.config_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AdapterLayer",
    "AdapterMethod",
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "active_adapters",
    "add_adapter",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "list_adapters",
    "load_adapter",
    "merge_adapters",
    "method_named",
    "method_names",
    "register_layer",
    "register_method",
    "route_adapters",
    "save_adapter",
    "set_active_adapters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
