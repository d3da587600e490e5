"""Value checks across config keys: ranges, and combinations that cannot be right, each named by
key in one ConfigError line. Run by config.build_config on every config it makes."""

from __future__ import annotations

import dataclasses

from .config import SECTIONS, Config
from .errors import ConfigError


def validate(cfg: Config) -> None:
    """Value checks and combinations that cannot be right, named by key."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            value = getattr(obj, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"config key '{f.name}' must be one of "
                                  f"{', '.join(map(str, choices))}; got '{value}'")
    positive = [("lora_rank", cfg.finetune.lora_rank), ("cutoff_len", cfg.data.cutoff_len),
                ("per_device_train_batch_size", cfg.train.per_device_train_batch_size),
                ("per_device_eval_batch_size", cfg.train.per_device_eval_batch_size),
                ("gradient_accumulation_steps", cfg.train.gradient_accumulation_steps),
                ("logging_steps", cfg.train.logging_steps), ("save_steps", cfg.train.save_steps),
                ("max_new_tokens", cfg.generate.max_new_tokens), ("export_size", cfg.export.export_size),
                ("api_max_batch_size", cfg.serve.api_max_batch_size),
                ("batch_size", cfg.evaluation.batch_size)]
    for key, value in positive:
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive; got {value}")
    if cfg.evaluation.n_shot < 0:
        raise ConfigError(f"config key 'n_shot' must be >= 0; got {cfg.evaluation.n_shot}")
    if cfg.serve.api_port is not None and not 0 < cfg.serve.api_port < 65536:
        raise ConfigError(f"config key 'api_port' must be a port number (1-65535); got {cfg.serve.api_port}")
    if cfg.train.eval_steps is not None and cfg.train.eval_steps <= 0:
        raise ConfigError(f"config key 'eval_steps' must be positive; got {cfg.train.eval_steps}")
    if cfg.data.val_size < 0:
        raise ConfigError(f"config key 'val_size' must be >= 0; got {cfg.data.val_size}")
    if cfg.data.max_samples is not None and cfg.data.max_samples <= 0:
        raise ConfigError(f"config key 'max_samples' must be positive; got {cfg.data.max_samples}")
    if not 0.0 <= cfg.finetune.lora_dropout < 1.0:
        raise ConfigError(f"config key 'lora_dropout' must be in [0, 1); got {cfg.finetune.lora_dropout}")
    if not 0.0 <= cfg.train.warmup_ratio <= 1.0:
        raise ConfigError(f"config key 'warmup_ratio' must be in [0, 1]; got {cfg.train.warmup_ratio}")
    if cfg.train.learning_rate <= 0:
        raise ConfigError(f"config key 'learning_rate' must be positive; got {cfg.train.learning_rate}")
    if cfg.data.neat_packing and cfg.data.packing is False:
        raise ConfigError("config key 'neat_packing' is true but packing is false; neat_packing "
                          "is a kind of packing: drop one of them")
    if cfg.train.bf16 and cfg.train.fp16:
        raise ConfigError("config keys 'bf16' and 'fp16' are both true; choose one")
    if cfg.train.max_steps <= 0 and cfg.train.num_train_epochs <= 0:
        raise ConfigError("set 'num_train_epochs' or 'max_steps' to a positive value")
    _validate_lora_variants(cfg)


def _validate_lora_variants(cfg: Config) -> None:
    ft, model = cfg.finetune, cfg.model
    if ft.finetuning_type != "lora":
        for key in ("use_dora", "pissa_init", "pissa_convert", "create_new_adapter", "loraplus_lr_ratio"):
            if getattr(ft, key) not in (None, False):
                raise ConfigError(f"config key '{key}' needs finetuning_type: lora "
                                  f"(got finetuning_type: {ft.finetuning_type})")
    if ft.pissa_iter != -1 and ft.pissa_iter < 1:
        raise ConfigError(f"config key 'pissa_iter' must be -1 (full SVD) or at least 1; "
                          f"got {ft.pissa_iter}")
    if ft.pissa_convert and not ft.pissa_init:
        raise ConfigError("config key 'pissa_convert' needs pissa_init: true")
    if ft.pissa_init and model.adapter_name_or_path and not ft.create_new_adapter:
        raise ConfigError("config key 'pissa_init' starts a new adapter, but adapter_name_or_path "
                          "continues training an existing one; set create_new_adapter: true (the "
                          "listed adapters are then merged first) or drop pissa_init")
    if ft.loraplus_lr_ratio is not None and ft.loraplus_lr_ratio <= 0:
        raise ConfigError(f"config key 'loraplus_lr_ratio' must be positive (e.g. 16); "
                          f"got {ft.loraplus_lr_ratio}")
    if model.quantization_bit is not None and ft.finetuning_type != "lora":
        raise ConfigError(f"config key 'quantization_bit' trains LoRA on a frozen quantized base; it needs "
                          f"finetuning_type: lora (got {ft.finetuning_type})")
    if ft.pissa_init and model.quantization_bit is not None:
        raise ConfigError("config key 'pissa_init' rewrites the base weights, which quantization_bit "
                          "freezes in 4/8 bits; use loftq_iter for a quantized base, or drop one")
    if ft.loftq_iter < 0:
        raise ConfigError(f"config key 'loftq_iter' must be >= 0; got {ft.loftq_iter}")
    if ft.loftq_iter and model.quantization_bit is None:
        raise ConfigError("config key 'loftq_iter' initialises LoRA for a quantized base; set "
                          "quantization_bit: 4 (or 8) too")
    if ft.loraplus_lr_embedding <= 0:
        raise ConfigError(f"config key 'loraplus_lr_embedding' must be positive; "
                          f"got {ft.loraplus_lr_embedding}")
