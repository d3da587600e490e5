"""tuneforge's adapter engine: LoRA on any `torch.nn.Module`, peft-compatible files.

    from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...train...
    save_adapter(model, "out/adapter")          # loads in peft / transformers / vLLM

Adapted modules keep their own parameter names (`q_proj.weight`); adapter tensors sit beside
them (`q_proj.lora_A.default`). peft's key layout exists only in `peft_format.py`.

Registry: one line per supported base layer type below; a new method adds its file and a line.
"""

from torch import nn

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
from .combine import combine_adapters
from .lora import Conv1D, LoraConv1D, LoraLayer, LoraLinear
from .lora_conv2d import LoraConv2d
from .lora_embedding import LoraEmbedding
from .lora_quant import LoraQuantLinear, QuantLinear
from .peft_format import load_adapter, save_adapter
from .registry import register_layer
from .routing import route_adapters

register_layer(nn.Linear, LoraLinear)
if Conv1D is not None:
    register_layer(Conv1D, LoraConv1D)  # transformers' GPT-2 style layer, weight stored (in, out)
register_layer(nn.Embedding, LoraEmbedding)
register_layer(nn.Conv2d, LoraConv2d)
register_layer(QuantLinear, LoraQuantLinear)  # QLoRA: a quantized base (tuneforge.quant)

__all__ = [
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
    "register_layer",
    "route_adapters",
    "save_adapter",
    "set_active_adapters",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
