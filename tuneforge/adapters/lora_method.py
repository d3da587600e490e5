"""LoRA as a registered method: its layer table, its adapter_config.json fields, its YAML keys.

The layers live in lora.py (Linear, Conv1D), lora_embedding.py, lora_conv2d.py and
lora_quant.py (a quantized base); the variants (DoRA, rsLoRA, PiSSA / OLoRA, the random inits) are
objects picked per adapter (variants.py, lora_variants.py; their maths in dora.py and inits.py);
LoftQ's start in loftq.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tuneforge.errors import ModelError

from .config import ALL_LINEAR, LoraConfig
from .layer import Conv1D
from .lora import LoraConv1D, LoraLayer, LoraLinear
from .lora_conv2d import LoraConv2d
from .lora_embedding import LoraEmbedding
from .lora_quant import LoraQuantLinear, QuantLinear
from .lora_ranks import KEYS as RANK_KEYS
from .lora_ranks import fit_ranks
from .lora_variants import Dora, RandomInit, RsLora, WeightInit  # noqa: F401 - registers LoRA's variants
from .methods import AdapterMethod, register_method
from .peft_config import HARMLESS, config_from_raw, non_empty, warn_unknown_fields, yaml_targets
from .sizes import check_adapter_size
from .targets import candidate_modules, minimal_suffixes, pattern_value

FIELDS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save", "bias",
    "use_rslora", "use_dora", "init_lora_weights", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "loftq_config",
)  # fmt: skip
# peft fields that change the maths; any non-empty value is refused until tuneforge implements it
UNSUPPORTED = (
    "lora_bias", "layer_replication", "use_qalora", "alora_invocation_tokens", "arrow_config",
    "velora_config", "monteclora_config", "kasa_config", "use_bdlora", "trainable_token_indices",
    "target_parameters", "modules_to_tie", "target_modules_to_tie",
)  # fmt: skip
# inits that only decide the starting A/B (overwritten by the loaded weights), and PiSSA / OLoRA,
# which alter the base deterministically: loading re-runs them on the base, then copies the file's
# A/B in (as peft does). 'pissa_niter_N' (randomised SVD) cannot be redone: refused in config_from_peft
_LOAD_SAFE_INITS = (True, False, "gaussian", "eva", "true", "false", "pissa", "olora")
# the finetune keys of a YAML config that LoRA reads (their help lives in config.py's key table)
KEYS = (
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora", "use_dora",
    "pissa_init", "pissa_iter", "pissa_convert", "loftq_iter", *RANK_KEYS,
)  # fmt: skip


def config_to_peft(model: nn.Module, name: str, cfg: LoraConfig, layers: list) -> dict[str, Any]:
    """LoRA's fields of adapter_config.json (peft's names; 'all-linear' written as the names it chose)."""
    targets = cfg.target_modules
    if targets == ALL_LINEAR:  # write the resolved names, as peft does
        targets = minimal_suffixes([p for p, _ in layers], [n for n, _ in candidate_modules(model)])
    return {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": targets,
        "exclude_modules": cfg.exclude_modules,
        "modules_to_save": cfg.modules_to_save,
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "lora_bias": False,
        "init_lora_weights": cfg.init_lora_weights,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "layer_replication": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        # tuneforge's LoftQ record (loftq.py); init_lora_weights stays true, as peft's 'loftq'
        # would re-run peft's own LoftQ at load (peft warns that it ignores this field)
        "loftq_config": dict(cfg.loftq_config),
    }


def config_from_peft(raw: dict[str, Any], source: str) -> LoraConfig:
    """A LoraConfig from peft's adapter_config.json; ModelError for what we cannot compute."""
    for key in UNSUPPORTED:
        if non_empty(raw.get(key)):
            raise ModelError(f"{source}: {key}={raw[key]!r} is not supported yet; this adapter cannot be loaded")
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise ModelError(
            f"{source}: init_lora_weights must be true, false or the name of an init such as 'gaussian', "
            f"'pissa' or 'olora', got {init!r}"
        )
    if isinstance(init, str) and init.lower() == "olora":  # peft compares it case-insensitively
        init = "olora"
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        raise ModelError(
            f"{source}: init_lora_weights={init!r} (PiSSA by randomised SVD) left a residual base that cannot "
            "be rebuilt exactly; load the converted adapter instead (pissa_convert: true writes it, or peft's "
            "save_pretrained with path_initial_model_for_weight_conversion)"
        )
    if not any(init is s or (isinstance(s, str) and init == s) for s in _LOAD_SAFE_INITS):
        raise ModelError(
            f"{source}: init_lora_weights={init!r} is not supported yet (it changes the base weights); "
            "save the adapter from peft with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    warn_unknown_fields(raw, (*FIELDS, *HARMLESS, *UNSUPPORTED), source)
    return config_from_raw(LoraConfig, raw, FIELDS, source,
                           init_lora_weights=init if init in (True, False, "gaussian", "pissa", "olora") else True)


def from_finetune_args(finetune) -> LoraConfig:
    """The LoraConfig a YAML config's finetune section asks for (LLaMA-Factory's key names)."""
    targets, extra = yaml_targets(finetune)
    return LoraConfig(
        r=finetune.lora_rank,
        lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank,
        lora_dropout=finetune.lora_dropout,
        target_modules=targets,
        modules_to_save=extra,
        use_rslora=finetune.use_rslora,
        use_dora=finetune.use_dora,
        init_lora_weights=pissa_init_name(finetune),
    )


def pissa_init_name(finetune) -> bool | str:
    """LLaMA-Factory's pissa_init / pissa_iter as peft's init_lora_weights."""
    if not finetune.pissa_init:
        return True
    return "pissa" if finetune.pissa_iter == -1 else f"pissa_niter_{finetune.pissa_iter}"


def _check_targets(targets: list, cfg: LoraConfig) -> None:
    check_adapter_size(targets, {p: pattern_value(cfg.rank_pattern, p, cfg.r) for p, _ in targets})


register_method(AdapterMethod(
    name="lora", peft_type="LORA", label="LoRA", prefix="Lora", config_class=LoraConfig, layer_class=LoraLayer,
    layers={nn.Linear: LoraLinear, Conv1D: LoraConv1D, nn.Embedding: LoraEmbedding, nn.Conv2d: LoraConv2d,
            QuantLinear: LoraQuantLinear},
    config_to_peft=config_to_peft, config_from_peft=config_from_peft, from_finetune_args=from_finetune_args,
    keys=KEYS, check_targets=_check_targets, fit_to_model=fit_ranks,
))  # fmt: skip
