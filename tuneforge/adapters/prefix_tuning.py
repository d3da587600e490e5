"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation")
and P-tuning v2 (Liu et al. 2022): `num_virtual_tokens` learned keys and values in front of every
attention layer. peft's `PrefixTuningConfig` field names, peft_type "PREFIX_TUNING".

    from tuneforge import PrefixTuningConfig, add_adapter
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True))

The prefix of all layers is one (num_virtual_tokens, num_layers * 2 * token_dim) tensor; row j
holds, per layer l, the key (2l) and value (2l + 1) of virtual token j as (num_attention_heads,
token_dim / num_attention_heads), where for a grouped-query model token_dim = head_dim *
num_key_value_heads and num_attention_heads = num_key_value_heads (peft's layout). It reaches the
model through the cache (a transformers DynamicCache filled before the real tokens; positions of
the real tokens start at num_virtual_tokens), see virtual_tokens.py.

With `prefix_projection` (training only) the prefix is reparametrised: an (N, token_dim) embedding
through Linear(token_dim, encoder_hidden_size), tanh, Linear(encoder_hidden_size, num_layers * 2 *
token_dim). `init_weights="zero"` (YAML `prefix_init: zero`, the default there) starts the
prefix at zero keys and values; peft's default (None) is random. Files hold the folded prefix
(`prompt_embeddings`, what the MLP outputs), as peft saves it; a loaded adapter holds that tensor
directly. Without projection the prefix is the embedding
itself: `finetuning_type: ptuning_v2` (same peft_type). Merging is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tuneforge.errors import ConfigError

from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields
from .virtual_tokens import PROMPT_FIELDS, attach, check_common, detach, model_dims

FIELDS = (*PROMPT_FIELDS, "encoder_hidden_size", "prefix_projection", "init_weights")
WHY = "prefix tuning adds key/value prefixes, which no weight can hold"


@dataclass
class PrefixTuningConfig:
    """Settings of one prefix-tuning adapter; names and meanings follow peft's `PrefixTuningConfig`."""

    num_virtual_tokens: int = 20
    """Key/value positions put in front of every attention layer."""
    encoder_hidden_size: int | None = None
    """Hidden size of the prefix_projection MLP; empty: token_dim."""
    prefix_projection: bool = False
    """Train the prefix through an MLP (folded into the prefix for saving)."""
    init_weights: str | None = None
    """None: random start (N(0, 1) embedding, as peft); "zero": the prefix starts at zero keys and values
    (the MLP's last layer at zero with prefix_projection)."""
    inference_mode: bool = False
    """True: the prefix is the plain (N, num_layers * 2 * token_dim) tensor (loaded adapters)."""
    token_dim: int | None = None
    """Key/value width per layer (filled in from the model)."""
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or empty, got {h!r}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be empty (random) or 'zero', got {self.init_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PrefixEncoder(nn.Module):
    """The prefix: `embedding` (N, L*2*dim), or (with projection) `embedding` (N, dim) + `transform`."""

    kind = "kv"

    def __init__(self, cfg: PrefixTuningConfig):
        super().__init__()
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.num_layers, self.num_attention_heads = cfg.num_layers, cfg.num_attention_heads
        out = cfg.num_layers * 2 * cfg.token_dim
        self.projection = cfg.prefix_projection and not cfg.inference_mode
        if self.projection:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, cfg.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(cfg.token_dim, cfg.encoder_hidden_size), nn.Tanh(), nn.Linear(cfg.encoder_hidden_size, out))
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            self.embedding = nn.Embedding(cfg.num_virtual_tokens, out)
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt(self) -> torch.Tensor:
        """(num_virtual_tokens, num_layers * 2 * token_dim)."""
        w = self.embedding.weight
        return self.transform(w) if self.projection else w

    def saved(self) -> torch.Tensor:
        return self.prompt().detach() if self.projection else self.embedding.weight


def _inject(model: nn.Module, cfg: PrefixTuningConfig, name: str, why: str = WHY) -> None:
    """Fill in cfg's model dimensions and attach its PrefixEncoder as virtual-token adapter `name`
    (`why`: its cannot-merge reason; MAM passes its own)."""
    for key, value in model_dims(model, kv=True).items():
        setattr(cfg, key, value)
    cfg.num_transformer_submodules = 1
    if cfg.encoder_hidden_size is None:
        cfg.encoder_hidden_size = cfg.token_dim
    attach(model, name, PrefixEncoder(cfg), why)


def _to_peft(model: nn.Module, name: str, cfg: PrefixTuningConfig, layers: list) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in PROMPT_FIELDS}
    out.update(encoder_hidden_size=cfg.encoder_hidden_size, prefix_projection=cfg.prefix_projection,
               init_weights=cfg.init_weights)
    return out


def _from_peft(raw: dict[str, Any], source: str) -> PrefixTuningConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(PrefixTuningConfig, raw, FIELDS, source, inference_mode=True)


def _from_finetune_args(finetune, projection: bool) -> PrefixTuningConfig:
    init = None if finetune.prefix_init == "random" else finetune.prefix_init
    return PrefixTuningConfig(num_virtual_tokens=finetune.num_virtual_tokens, prefix_projection=projection,
                              encoder_hidden_size=finetune.encoder_hidden_size if projection else None,
                              init_weights=init)


register_method(AdapterMethod(
    cannot_merge=lambda cfg: WHY,
    name="prefix", peft_type="PREFIX_TUNING", label="prefix tuning", config_class=PrefixTuningConfig,
    inject=_inject, remove=detach, config_to_peft=_to_peft, config_from_peft=_from_peft,
    from_finetune_args=lambda ft: _from_finetune_args(ft, ft.prefix_projection),
    keys=("num_virtual_tokens", "encoder_hidden_size", "prefix_projection", "prefix_init"),
))  # fmt: skip
register_method(AdapterMethod(
    cannot_merge=lambda cfg: WHY,
    name="ptuning_v2", peft_type="PREFIX_TUNING", label="P-tuning v2", config_class=PrefixTuningConfig,
    inject=_inject, remove=detach, config_to_peft=_to_peft, config_from_peft=_from_peft,
    from_finetune_args=lambda ft: _from_finetune_args(ft, False), keys=("num_virtual_tokens", "prefix_init"),
))  # fmt: skip
