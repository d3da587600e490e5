"""MAM adapters ("mix-and-match", He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", section 4.3): prefix tuning on attention plus a scaled parallel bottleneck
adapter beside the feed-forward block, trained and saved as ONE adapter.

    attention:     keys / values of every layer get `num_virtual_tokens` learned prefixes
                   (prefix_tuning.PrefixEncoder, in the cache; see virtual_tokens.py)
    feed-forward:  y = ffn(x) + s * (W_up f(W_down x + b_down) + b_up)
                   (bottleneck.BottleneckAdapter, parallel, s = adapter_scaling; the paper: 4)

Shapes: the prefix is (num_virtual_tokens, num_layers * 2 * token_dim) (peft's prefix layout);
each adapter has `adapter_down` (adapter_size, hidden) + bias and `adapter_up` (hidden, adapter_size)
+ bias, fp32. At start the adapter adds nothing (zero up-projection) and, with `init_weights="zero"`
(the default here; YAML `prefix_init: zero`), the prefix holds zero keys and values (near the base
model: they only take a share of the attention).

peft has no MAM method. Files use peft's layout with peft_type "MAM": `prompt_embeddings` (the
folded prefix, as peft's prefix tuning saves it) and `base_model.model.<ffn>.adapter_down.weight`,
`.adapter_down.bias`, `.adapter_up.weight`, `.adapter_up.bias` (as BOTTLENECK files), and load back
in tuneforge. Merging is refused: the prefix is extra key/value positions and the adapter has a
nonlinearity between its projections; neither can live in a weight.

Errors: ConfigError (one line naming the field) for bad settings, for a model that is not a
decoder-only language model, and for a model type without a known feed-forward block (set
target_modules); ModelError for an adapter_config.json that cannot load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from tuneforge.errors import ConfigError

from .bottleneck import BottleneckConfig, BottleneckLayer, scaling_kwarg
from .bottleneck import _resolve_targets as _bottleneck_targets
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, split_names, warn_unknown_fields
from .prefix_tuning import PrefixTuningConfig
from .prefix_tuning import _inject as _inject_prefix
from .virtual_tokens import PROMPT_FIELDS, detach

PREFIX_FIELDS = (*PROMPT_FIELDS, "encoder_hidden_size", "prefix_projection", "init_weights")
ADAPTER_FIELDS = ("adapter_size", "adapter_act", "adapter_scaling", "target_modules", "exclude_modules",
                  "init_bottleneck_weights")  # fmt: skip
FIELDS = (*PREFIX_FIELDS, *ADAPTER_FIELDS)
WHY = ("a MAM adapter adds key/value prefixes and a bottleneck adapter with a nonlinearity between its "
       "projections, which no weight can hold")


@dataclass
class MamConfig:
    """Settings of one MAM adapter: prefix tuning's fields (peft's PrefixTuningConfig names) and the
    parallel bottleneck adapter's (BottleneckConfig's names; adapter_type is always parallel)."""

    num_virtual_tokens: int = 20
    """Key/value positions put in front of every attention layer (He et al.: 30)."""
    encoder_hidden_size: int | None = None
    """Hidden size of the prefix_projection MLP; empty: token_dim."""
    prefix_projection: bool = False
    """Train the prefix through an MLP (folded into the prefix for saving)."""
    init_weights: str | None = "zero"
    """"zero": the prefix starts at zero keys and values; None: random (N(0, 1), as peft's prefix)."""
    adapter_size: int = 64
    """Width r of the parallel bottleneck adapter (He et al.: 512)."""
    adapter_act: str = "relu"
    """Nonlinearity between the adapter's projections: relu, gelu, silu or tanh."""
    adapter_scaling: float = 4.0
    """s, the factor on the adapter's output (He et al.: 4)."""
    target_modules: list[str] | str | None = None
    """Modules the parallel adapter sits beside; empty: the feed-forward block of each layer."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes, or a regex (full match)."""
    init_bottleneck_weights: bool = True
    """True: the up-projection starts at zero; False: random (for tests)."""
    inference_mode: bool = False
    """True: the prefix is the plain (N, num_layers * 2 * token_dim) tensor (loaded adapters)."""
    token_dim: int | None = None
    """Key/value width per layer (filled in from the model)."""
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    """Not supported (virtual-token methods refuse it)."""
    adapter_type = "parallel"  # what the bottleneck code reads; not a field
    layers_to_transform = None  # no layer selection; target matching reads these
    layers_pattern = None

    def __post_init__(self) -> None:
        # each part checks its own fields (one line naming the field); the checked values are kept
        prefix = PrefixTuningConfig(**{k: getattr(self, k) for k in PREFIX_FIELDS}, inference_mode=self.inference_mode)
        adapter = BottleneckConfig(adapter_type="parallel", **{k: getattr(self, k) for k in ADAPTER_FIELDS})
        for k in ADAPTER_FIELDS:
            setattr(self, k, getattr(adapter, k))
        self.init_weights = prefix.init_weights

    @property
    def parallel(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MamLayer(BottleneckLayer):
    """The parallel bottleneck adapter of a MAM adapter beside one module (BottleneckLayer's maths);
    the prefix lives in the model's virtual-token module."""

    method_name = "mam"

    def cannot_merge(self) -> str | None:
        return WHY


class MamModule(MamLayer, nn.Module):
    """Registered for nn.Module: every module type gets a derived class `Mam<Type>`."""


def _inject(model: nn.Module, cfg: MamConfig, name: str) -> None:
    """Attach the prefix (prefix_tuning's encoder); the adapter layers follow in add_adapter."""
    _inject_prefix(model, cfg, name, why=WHY)


def _resolve_targets(model: nn.Module, cfg: MamConfig) -> list[tuple[str, nn.Module]]:
    try:
        return _bottleneck_targets(model, cfg)
    except ConfigError as e:
        raise ConfigError(f"MAM's parallel adapter: {e}") from None


def _to_peft(model: nn.Module, name: str, cfg: MamConfig, layers: list) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in FIELDS}


def _from_peft(raw: dict[str, Any], source: str) -> MamConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(MamConfig, raw, FIELDS, source, inference_mode=True)


def _from_finetune_args(finetune) -> MamConfig:
    """YAML: num_virtual_tokens, prefix_projection, prefix_init, encoder_hidden_size (the prefix);
    adapter_size, adapter_act, adapter_scaling (the adapter); lora_target 'all' (the default): the
    feed-forward blocks, a comma list names the modules instead."""
    target = finetune.lora_target.strip()
    targets = None if target in ("all", "all-linear", "") else split_names(target)
    return MamConfig(
        num_virtual_tokens=finetune.num_virtual_tokens, prefix_projection=finetune.prefix_projection,
        encoder_hidden_size=finetune.encoder_hidden_size if finetune.prefix_projection else None,
        init_weights=None if finetune.prefix_init == "random" else finetune.prefix_init,
        adapter_size=finetune.adapter_size, adapter_act=finetune.adapter_act,
        target_modules=targets, **scaling_kwarg(finetune))


register_method(AdapterMethod(
    name="mam", peft_type="MAM", label="MAM", prefix="Mam", config_class=MamConfig, layer_class=MamLayer,
    layers={nn.Module: MamModule}, inject=_inject, remove=detach, resolve_targets=_resolve_targets,
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    cannot_merge=lambda cfg: WHY,
    keys=("lora_target", "num_virtual_tokens", "encoder_hidden_size", "prefix_projection", "prefix_init",
          "adapter_size", "adapter_act", "adapter_scaling"),
))  # fmt: skip
