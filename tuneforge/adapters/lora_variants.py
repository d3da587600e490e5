"""The LoRA variants tuneforge ships, as `LoraVariant` objects (variants.py) picked per adapter:

- `Dora` (`use_dora`): a trained magnitude per output row; its maths is in dora.py;
- `RsLora` (`use_rslora`): scaling `alpha / sqrt(r)` instead of `alpha / r`;
- `WeightInit` (`init_lora_weights` 'pissa', 'pissa_niter_N', 'olora'): A and B taken out of the
  base weight, the residual left in it (inits.py); given back when the adapter is dropped unmerged;
- `RandomInit` (`init_lora_weights` True, False, 'gaussian'): the layer type's random start.

LoftQ's start (loftq.py) is an init object too, set by `apply_loftq` when the base is quantized.
Registration order is selection order: the first init that fills A and B wins, RandomInit last.
"""

from __future__ import annotations

import math

from torch import nn

from tuneforge.errors import ConfigError

from . import dora, inits
from .variants import LoraVariant, register_variant


class Dora(LoraVariant):
    key, kind, describe = "dora", "maths", "dora"
    owns_forward, additive = True, False
    param_dicts = ("lora_magnitude_vector",)  # per-row magnitude (fp32), peft's key
    state_attrs = ("_dora_cache", "_dora_factors")

    @classmethod
    def select(cls, cfg):
        return cls() if getattr(cfg, "use_dora", False) else None

    @classmethod
    def setup_layer(cls, layer) -> None:
        layer._dora_cache = {}  # ||W||^2 per row, keyed on the weight's version (dora.py)
        layer._dora_factors = {}  # per-row factor of each merged DoRA adapter

    def check(self, layer_cls: type, module, path: str) -> None:
        if not getattr(layer_cls, "supports_dora", False):
            base = getattr(module, "_lora_base_class", type(module)).__name__
            raise ConfigError(
                f"use_dora is not supported for {base} layers yet (target {path}); "
                f"set use_dora=False or leave {path} out of target_modules"
            )
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            raise ConfigError(
                f"{path} is a Conv2d with groups={module.groups}; DoRA needs groups=1 (its weight norm of "
                "W + s B A is undefined for grouped kernels); set use_dora=False or leave it out of target_modules"
            )

    def after_init(self, layer, name: str) -> None:
        dora.init_magnitude(layer, name)  # peft: after the LoRA init, m = ||W + s B A|| per row

    def on_new_base(self, layer) -> None:
        layer._dora_cache = {}  # the norms of the old weight

    def extra_tensors(self, layer, name: str) -> dict:
        mags = layer.lora_magnitude_vector
        return {"lora_magnitude_vector": mags[name]} if name in mags else {}  # peft: no '.weight'

    def add_adapters(self, layer, x, out, names):
        if isinstance(layer, nn.Embedding):
            return dora.add_adapters_embedding(layer, x, out, names)
        if isinstance(layer, nn.Conv2d):
            return dora.add_adapters_conv2d(layer, x, out, names)
        return dora.add_adapters(layer, x, out, names)

    def combine_refusal(self, names):
        return (
            f"adapters {names} use DoRA, whose magnitude vectors have no weighted combination; "
            "combine plain LoRA adapters only"
        )

    def merged_weight(self, layer, todo):
        w, factors = dora.merged_weight(layer, todo)
        return w, lambda: layer._dora_factors.update(factors)

    def unmerged_weight(self, layer, names):
        w, removed = dora.unmerged_weight(layer, names)
        for n in removed:
            layer._dora_factors.pop(n, None)
        return w, removed


class RsLora(LoraVariant):
    key, kind = "rslora", "scaling"

    @classmethod
    def select(cls, cfg):
        return cls() if getattr(cfg, "use_rslora", False) else None

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r)


class WeightInit(LoraVariant):
    """PiSSA / OLoRA (inits.py); embeddings get their default start instead, as in peft."""

    key, kind = "weight_init", "init"
    state_attrs = ("lora_initial",)  # (A0, B0) per adapter, set by inits.init_from_weight

    def __init__(self, init: str) -> None:
        self.init_name = init

    @classmethod
    def select(cls, cfg):
        init = getattr(cfg, "init_lora_weights", True)
        return cls(init) if inits.is_weight_init(init) else None

    def check(self, layer_cls: type, module, path: str) -> None:
        if getattr(layer_cls, "quantized_base", False):
            raise ConfigError(
                f"init_lora_weights={self.init_name!r} rewrites the base weight, which is quantized here; "
                "use loftq_iter (LoftQ) for a quantized base, or drop quantization_bit"
            )

    def init(self, layer, name: str) -> bool:
        if getattr(layer, "weight_inits", True):
            inits.init_from_weight(layer, name, self.init_name)
        else:
            layer.init_lora_weights(name, self.init_name)
        return True

    def release(self, layer, name: str) -> None:
        inits.restore_base(layer, name)  # the start it took out of the weight

    def combine_refusal(self, names):
        # A, B are not an update of the base, and re-running the init would change the base again
        return (
            f"adapters {names} were initialised from the base weights (init_lora_weights={self.init_name!r}); "
            "save them with save_adapter(..., convert_pissa=True), load those plain LoRAs on the original base "
            "and combine them"
        )


class RandomInit(LoraVariant):
    key, kind = "random_init", "init"
    last = True

    def __init__(self, init) -> None:
        self.init_value = init

    @classmethod
    def select(cls, cfg):
        init = getattr(cfg, "init_lora_weights", True)
        return None if inits.is_weight_init(init) else cls(init)

    def init(self, layer, name: str) -> bool:
        layer.init_lora_weights(name, self.init_value)
        return True


for _variant in (Dora, RsLora, WeightInit, RandomInit):
    register_variant(_variant)
