"""The parts of peft's adapter_config.json every method shares: the common fields written first,
the fields that never change what an adapter computes, and the warning for fields nobody knows.
Each method's own fields are read and written by its record (methods.py)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from tuneforge.errors import ConfigError, ModelError

# peft fields that never change what a loaded adapter computes
HARMLESS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "megatron_config", "megatron_core", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
}  # fmt: skip


def non_empty(v: Any) -> bool:
    return v not in (None, False, "", 0) and v != {} and v != []


def warn_unknown_fields(raw: dict, known: Iterable[str], source: str) -> None:
    """One warning naming the set fields of `raw` that are neither `known` nor harmless."""
    known = set(known) | HARMLESS
    ignored = [k for k in sorted(raw) if k not in known and non_empty(raw[k])]
    if ignored:
        warnings.warn(f"{source}: ignoring fields tuneforge does not know: {ignored}", stacklevel=4)


def config_from_raw(config_class: type, raw: dict, fields: Iterable[str], source: str, **fixed: Any):
    """`config_class(**fields of raw that are set, **fixed)`, its ConfigError raised again as a
    ModelError naming `source` (the adapter_config.json being read)."""
    kwargs = {k: raw[k] for k in fields if k in raw and raw[k] is not None}
    kwargs.update(fixed)
    try:
        return config_class(**kwargs)
    except ConfigError as e:
        raise ModelError(f"{source}: {e}") from None


def split_names(value: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (LLaMA-Factory's comma-separated module lists)."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def yaml_targets(finetune) -> tuple[str | list[str], list[str] | None]:
    """(target_modules, modules_to_save) from LLaMA-Factory's lora_target and additional_target
    keys: lora_target "all" (or "all-linear") is peft's "all-linear"."""
    target = finetune.lora_target.strip()
    targets = "all-linear" if target in ("all", "all-linear") else split_names(target)
    return targets, split_names(finetune.additional_target) or None


def common_fields(model: nn.Module, peft_type: str, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The fields peft writes for every method."""
    if base_model_name_or_path is None:
        base_model_name_or_path = name_or_path(model)
    return {
        "peft_type": peft_type,
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
    }


def name_or_path(model: nn.Module) -> str | None:
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return path or None


def task_type(model: nn.Module) -> str | None:
    """peft's task_type for transformers generative models (CAUSAL_LM, SEQ_2_SEQ_LM) and sequence
    classifiers (SEQ_CLS: a transformers *ForSequenceClassification class); None for anything else."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    try:
        from transformers import GenerationMixin
    except ImportError:
        return None
    if not isinstance(model, GenerationMixin):
        return None
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"
