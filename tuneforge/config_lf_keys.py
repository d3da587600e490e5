"""LLaMA-Factory's keys for gradient checkpointing, pure bf16 and added tokens: how they combine
with tuneforge's own keys (checked by config_checks.validate, one ConfigError line per conflict)
and what they resolve to for the run (read by workflows.train and models.py)."""

from __future__ import annotations

import inspect

from .errors import ConfigError

# LLaMA-Factory's GeneratingArguments defaults, which its predict (do_predict) decodes with
LF_DECODING = {"do_sample": True, "temperature": 0.95, "top_p": 0.7, "top_k": 50, "max_new_tokens": 1024,
               "repetition_penalty": 1.0}

_GC_HOW = ("set gradient_checkpointing: true (or disable_gradient_checkpointing: false, "
           "LLaMA-Factory's default)")


def checkpoint_options() -> set[str]:
    """The keyword arguments torch.utils.checkpoint.checkpoint takes that a YAML value can give
    (context_fn is a function)."""
    from torch.utils.checkpoint import checkpoint

    params = inspect.signature(checkpoint).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "context_fn"}


def gradient_checkpointing(cfg, chosen: bool = False) -> dict | None:
    """The keyword arguments of torch's checkpoint function for this run, or None for no gradient
    checkpointing. On when gradient_checkpointing is true or disable_gradient_checkpointing is false
    (LLaMA-Factory's default, there on unless disabled), or when `chosen` (train/memory_plan.py,
    both keys empty); use_reentrant from use_reentrant_gc, else from gradient_checkpointing_kwargs,
    else true (LLaMA-Factory's default)."""
    on = cfg.train.gradient_checkpointing or cfg.model.disable_gradient_checkpointing is False or chosen
    if not on:
        return None
    kwargs = dict(cfg.train.gradient_checkpointing_kwargs or {})
    if cfg.model.use_reentrant_gc is not None:
        kwargs["use_reentrant"] = cfg.model.use_reentrant_gc
    kwargs.setdefault("use_reentrant", True)
    return kwargs


def checkpointing_left_empty(cfg) -> bool:
    """Neither gradient_checkpointing nor disable_gradient_checkpointing is set: the run chooses."""
    return cfg.train.gradient_checkpointing is None and cfg.model.disable_gradient_checkpointing is None


def validate_lf_keys(cfg, given) -> None:
    """Contradictions between LLaMA-Factory's keys and tuneforge's, and values they cannot take."""
    model, train = cfg.model, cfg.train
    disable = model.disable_gradient_checkpointing
    if disable is not None and "gradient_checkpointing" in given and train.gradient_checkpointing == disable:
        raise ConfigError(
            f"config keys 'gradient_checkpointing: {str(train.gradient_checkpointing).lower()}' and "
            f"'disable_gradient_checkpointing: {str(disable).lower()}' contradict each other; keep one of them")
    kwargs = train.gradient_checkpointing_kwargs or {}
    unknown = sorted(set(kwargs) - checkpoint_options())
    if unknown:
        raise ConfigError(f"config key 'gradient_checkpointing_kwargs' has '{unknown[0]}', which "
                          "torch.utils.checkpoint.checkpoint does not take; use "
                          f"{', '.join(sorted(checkpoint_options()))}")
    if "use_reentrant" in kwargs and not isinstance(kwargs["use_reentrant"], bool):
        raise ConfigError("config key 'gradient_checkpointing_kwargs': use_reentrant must be true or false; "
                          f"got {kwargs['use_reentrant']!r}")
    if model.use_reentrant_gc is not None and kwargs.get("use_reentrant", model.use_reentrant_gc) \
            != model.use_reentrant_gc:
        raise ConfigError(
            f"config keys 'use_reentrant_gc: {str(model.use_reentrant_gc).lower()}' and "
            f"'gradient_checkpointing_kwargs: {{use_reentrant: {str(kwargs['use_reentrant']).lower()}}}' "
            "contradict each other; keep one of them")
    if cfg.finetune.pure_bf16:
        if train.fp16:
            raise ConfigError("config keys 'pure_bf16' and 'fp16' are both true; pure_bf16 trains in bf16 "
                              "without mixed precision: choose one")
        if "bf16" in given and train.bf16 is False:
            raise ConfigError("config key 'pure_bf16' is true but bf16 is false; pure_bf16 trains in bf16 "
                              "(without mixed precision): drop bf16: false")
    if model.new_special_tokens and model.add_special_tokens and \
            _tokens(model.new_special_tokens) != _tokens(model.add_special_tokens):
        raise ConfigError("config keys 'new_special_tokens' and 'add_special_tokens' (its newer name in "
                          "LLaMA-Factory) list different tokens; keep one of them")
    if model.quantization_bit is not None:
        for key in ("new_special_tokens", "add_special_tokens", "add_tokens", "resize_vocab"):
            if getattr(model, key):
                raise ConfigError(f"config key '{key}' resizes the embeddings, which a quantized model "
                                  "(quantization_bit) cannot: drop one of them")
    if gradient_checkpointing(cfg) is None:
        for key in ("use_reentrant_gc", "gradient_checkpointing_kwargs"):
            if key in given and (getattr(model, key, None) is not None or getattr(train, key, None)):
                raise ConfigError(f"config key '{key}' sets up gradient checkpointing, which is off in "
                                  f"this config: {_GC_HOW}, or drop {key}")


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
