"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning"): LoRA, prefix tuning and a bottleneck adapter in one adapter, each behind a learned sigmoid
gate on its layer input, so training learns which parts to use (the maths: unipelt_layers.py).

    from tuneforge import UniPeltConfig, add_adapter
    add_adapter(model, UniPeltConfig(r=8, num_virtual_tokens=10, adapter_size=64))

Where the parts go:
- LoRA on `target_modules` (Linear layers; empty: the attention query and value projections, the
  paper's choice: q_proj, v_proj in Llama, c_attn in GPT-2), gate g_L per layer;
- a prefix of `num_virtual_tokens` keys and values in every attention layer (prefix_tuning's
  encoder, `prefix_projection` optional), gate g_P per attention module;
- a sequential bottleneck adapter after each block of `adapter_modules` (empty: the feed-forward
  block, `mlp`, the paper's place after the FFN), gate g_A per adapter.
With every gate at 1 the adapter is the three methods applied together; with every gate at 0 it is
the base model. At the start it adds nothing but the gated zero prefix (LoRA's B and the adapter's
up-projection start at zero; `init_weights="zero"`, YAML `prefix_init: zero`, the default).

peft has no UniPELT: files use peft's layout with peft_type "UNIPELT" and load back in tuneforge:
`prompt_embeddings` (the folded prefix), `base_model.model.<linear>.lora_A.weight` / `.lora_B.weight`
/ `.lora_gate.weight` / `.lora_gate.bias`, `<attention>.prefix_gate.weight` / `.bias`,
`<block>.adapter_down.*` / `.adapter_up.*` / `.adapter_gate.*`. Merging is refused (the gates depend
on the input). Needs a decoder-only transformers model with an attention module per layer.

Errors: ConfigError (one line naming the field) for bad settings, targets that cannot take their
part, and models without the parts' places; ModelError for an adapter_config.json that cannot load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant.linear import QuantLinear

from .bottleneck import DEFAULT_TARGETS as ADAPTER_PLACES
from .bottleneck import BottleneckConfig, module_features, scaling_kwarg
from .config import ALL_LINEAR, _names_or_regex
from .layer import Conv1D
from .methods import AdapterMethod, register_method
from .peft_config import config_from_raw, warn_unknown_fields, yaml_targets
from .prefix_tuning import PrefixTuningConfig
from .prefix_tuning import _inject as _inject_prefix
from .targets import candidate_modules, linear_types, minimal_suffixes, resolve_targets
from .unipelt_layers import (
    WHY,
    GatedLora,
    UniPeltConv1D,
    UniPeltLayer,
    UniPeltLinear,
    UniPeltModule,
    UniPeltQuantLinear,
)
from .virtual_tokens import PROMPT_FIELDS, detach, model_dims

PREFIX_FIELDS = (*PROMPT_FIELDS, "encoder_hidden_size", "prefix_projection", "init_weights")
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights")
ADAPTER_FIELDS = ("adapter_size", "adapter_act", "adapter_scaling", "adapter_modules", "init_bottleneck_weights")
FIELDS = (*PREFIX_FIELDS, *LORA_FIELDS, *ADAPTER_FIELDS, "exclude_modules")
# the paper's LoRA places: the attention query and value projections
DEFAULT_LORA_TARGETS = {
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "granite",
                                         "phi")},
    "phi3": ["qkv_proj"],  # Phi-3 fuses the query, key and value projections
    "gpt2": ["c_attn"],
}


@dataclass
class UniPeltConfig:
    """Settings of one UniPELT adapter: LoRA's fields (peft's LoraConfig names), prefix tuning's
    (peft's PrefixTuningConfig names) and the bottleneck adapter's (BottleneckConfig's names)."""

    r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on LoRA's input while training."""
    target_modules: list[str] | str | None = None
    """Linear layers that get gated LoRA (names/suffixes, a regex, or 'all-linear'); empty: q_proj, v_proj."""
    init_lora_weights: bool = True
    """True: B starts at zero (LoRA adds nothing at the start); False: random (for tests)."""
    num_virtual_tokens: int = 10
    """Key/value positions put in front of every attention layer (the paper: 10)."""
    encoder_hidden_size: int | None = None
    """Hidden size of the prefix_projection MLP; empty: token_dim."""
    prefix_projection: bool = False
    """Train the prefix through an MLP (folded into the prefix for saving)."""
    init_weights: str | None = "zero"
    """"zero": the prefix starts at zero keys and values; None: random (N(0, 1), as peft's prefix)."""
    adapter_size: int = 64
    """Bottleneck width of the adapters."""
    adapter_act: str = "relu"
    """Nonlinearity between the adapter's projections: relu, gelu, silu or tanh."""
    adapter_scaling: float = 1.0
    """Factor on the adapter's output."""
    adapter_modules: list[str] | str | None = None
    """Blocks followed by a gated adapter (names/suffixes or a regex); empty: the feed-forward block."""
    init_bottleneck_weights: bool = True
    """True: the adapter's up-projection starts at zero; False: random (for tests)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted (LoRA or adapter): names/suffixes, or a regex (full match)."""
    inference_mode: bool = False
    """True: the prefix is the plain (N, num_layers * 2 * token_dim) tensor (loaded adapters)."""
    token_dim: int | None = None
    """Key/value width per layer (filled in from the model)."""
    num_transformer_submodules: int | None = 1
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    """Not supported (virtual-token methods refuse it)."""
    layers_to_transform = None  # no layer selection; target matching reads these
    layers_pattern = None

    def __post_init__(self) -> None:
        # each part checks its own fields (one line naming the field); the checked values are kept
        prefix = PrefixTuningConfig(**{k: getattr(self, k) for k in PREFIX_FIELDS}, inference_mode=self.inference_mode)
        self.init_weights = prefix.init_weights
        adapter = BottleneckConfig(adapter_type="houlsby", adapter_size=self.adapter_size, adapter_act=self.adapter_act,
                                   adapter_scaling=self.adapter_scaling, init_bottleneck_weights=self.init_bottleneck_weights)
        self.adapter_scaling = adapter.adapter_scaling
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r must be a positive whole number, got {self.r!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ConfigError(f"lora_alpha must be a positive number, got {alpha!r}")
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {p!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise ConfigError(f"init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        for key in ("target_modules", "adapter_modules", "exclude_modules"):
            setattr(self, key, _names_or_regex(key, getattr(self, key)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _select(model: nn.Module, cfg: UniPeltConfig, targets: Any) -> list[tuple[str, nn.Module]]:
    return resolve_targets(model, SimpleNamespace(target_modules=targets, exclude_modules=cfg.exclude_modules,
                                                  modules_to_save=None, layers_to_transform=None, layers_pattern=None))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each layer's attention module (a transformers `...Attention` with its
    layer_idx), in layer order; ConfigError when there is not exactly one per layer."""
    layers = model_dims(model, kv=True)["num_layers"]
    found = [(p, m) for p, m in candidate_modules(model)
             if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]
    if len(found) != layers or sorted(m.layer_idx for _, m in found) != list(range(layers)):
        raise ConfigError(f"UniPELT gates the prefix in each layer's attention module, but {type(model).__name__} "
                          f"has {len(found)} attention modules with a layer_idx for {layers} layers")
    return found


def _resolve_targets(model: nn.Module, cfg: UniPeltConfig) -> list[tuple[str, nn.Module]]:
    """LoRA's Linear layers, the attention modules (prefix gates) and the adapter blocks, in model
    order; the defaults for the model type are written into `cfg`."""
    model_type = _model_type(model)
    if cfg.target_modules is None:
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ConfigError(f"UniPELT has no default LoRA places for model type {model_type!r}; set target_modules "
                              "(lora_target in YAML) to the attention projections")
        cfg.target_modules = list(DEFAULT_LORA_TARGETS[model_type])
    if cfg.adapter_modules is None:
        place = ADAPTER_PLACES.get(model_type, {}).get("parallel")
        if not isinstance(place, list):
            raise ConfigError(f"UniPELT has no default adapter place for model type {model_type!r}; set "
                              "adapter_modules to the feed-forward blocks")
        cfg.adapter_modules = list(place)
    attention = attention_modules(model)
    lora = _select(model, cfg, cfg.target_modules)
    lin = linear_types()
    for path, module in lora:
        if not isinstance(module, lin):
            raise ConfigError(f"UniPELT's LoRA goes on Linear layers; target_modules matched {path}, a "
                              f"{type(module).__name__}: narrow target_modules (lora_target)")
    blocks = _select(model, cfg, cfg.adapter_modules)
    taken = {p for p, _ in attention}
    for path, module in blocks:
        if isinstance(module, lin) or path in taken or module_features(module) is None:
            raise ConfigError(f"UniPELT's adapter goes after a block that holds Linear layers (the feed-forward "
                              f"block, e.g. mlp); adapter_modules matched {path}, a {type(module).__name__}")
    chosen = {p for p, _ in (*lora, *attention, *blocks)}
    return [(p, m) for p, m in candidate_modules(model) if p in chosen]


def _shared(model: nn.Module, cfg: UniPeltConfig, name: str, targets: list) -> SimpleNamespace:
    """What the layers need to know: which targets are attention modules, the hidden size, the model."""
    hidden = model_dims(model, kv=False)["token_dim"]
    return SimpleNamespace(attention={p for p, _ in attention_modules(model)}, hidden_size=hidden, model=model)


def _inject(model: nn.Module, cfg: UniPeltConfig, name: str) -> None:
    """Attach the prefix (prefix_tuning's encoder); the gated layers follow in add_adapter."""
    _inject_prefix(model, cfg, name, why=WHY)


def _to_peft(model: nn.Module, name: str, cfg: UniPeltConfig, layers: list) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in FIELDS}
    if cfg.target_modules == ALL_LINEAR:
        lora = [p for p, m in layers if isinstance(m, GatedLora)]
        out["target_modules"] = minimal_suffixes(lora, [n for n, _ in candidate_modules(model)])
    return out


def _from_peft(raw: dict[str, Any], source: str) -> UniPeltConfig:
    warn_unknown_fields(raw, FIELDS, source)
    return config_from_raw(UniPeltConfig, raw, FIELDS, source, inference_mode=True)


def _from_finetune_args(finetune) -> UniPeltConfig:
    """YAML: lora_rank, lora_alpha (empty: 2 x rank), lora_dropout, lora_target ('all': every linear
    layer; the paper's q_proj,v_proj is a comma list away) for LoRA; num_virtual_tokens,
    prefix_projection, prefix_init, encoder_hidden_size for the prefix; adapter_size, adapter_act,
    adapter_scaling for the adapter after each feed-forward block."""
    targets, _ = yaml_targets(finetune)
    return UniPeltConfig(
        r=finetune.lora_rank,
        lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank,
        lora_dropout=finetune.lora_dropout, target_modules=targets,
        num_virtual_tokens=finetune.num_virtual_tokens, prefix_projection=finetune.prefix_projection,
        encoder_hidden_size=finetune.encoder_hidden_size if finetune.prefix_projection else None,
        init_weights=None if finetune.prefix_init == "random" else finetune.prefix_init,
        adapter_size=finetune.adapter_size, adapter_act=finetune.adapter_act,
        **scaling_kwarg(finetune))


register_method(AdapterMethod(
    name="unipelt", peft_type="UNIPELT", label="UniPELT", prefix="UniPelt", config_class=UniPeltConfig,
    layer_class=UniPeltLayer,
    layers={nn.Linear: UniPeltLinear, Conv1D: UniPeltConv1D, QuantLinear: UniPeltQuantLinear, nn.Module: UniPeltModule},
    inject=_inject, remove=detach, resolve_targets=_resolve_targets, shared=_shared,
    config_to_peft=_to_peft, config_from_peft=_from_peft, from_finetune_args=_from_finetune_args,
    cannot_merge=lambda cfg: WHY,
    keys=("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "num_virtual_tokens", "encoder_hidden_size",
          "prefix_projection", "prefix_init", "adapter_size", "adapter_act", "adapter_scaling"),
))  # fmt: skip
