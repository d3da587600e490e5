"""How a config's method keys choose and complete the adapter method, before validation:
adapter_methods.METHOD_SELECTORS (`finetuning_type: lora` with `adaptive: moe` is lora_moe) and
the method keys' aliases (a lora_moe config's `top_k`). config.build_config calls both."""

from __future__ import annotations

import logging

from .adapter_methods import METHOD_KEYS, METHOD_SELECTORS
from .errors import ConfigError


def apply_aliases(cfg, values: dict, known: dict) -> None:
    """A method key's `alias` (adapter_methods.key): in a config of a method that reads the key and
    does not set it, the alias's value sets it, and the alias's own field keeps its default (one
    info line says so). `known`: config.all_fields()."""
    for name, spec in METHOD_KEYS.items():
        alias = spec.get("alias")
        if not alias or alias not in values or name in values or \
                cfg.finetune.finetuning_type not in spec["methods"]:
            continue
        section, f = known[alias]
        holder = getattr(cfg, section)
        setattr(cfg.finetune, name, getattr(holder, alias))
        setattr(holder, alias, f.default)
        logging.getLogger("tuneforge").info("%s: %s is %s of finetuning_type: %s (%s stays at its default)",
                                            alias, values[alias], name, cfg.finetune.finetuning_type, alias)


def select_method(finetune) -> str | None:
    """Apply adapter_methods.METHOD_SELECTORS: `finetuning_type: lora` with `adaptive: moe` becomes
    finetuning_type lora_moe. Returns what was done ('finetuning_type: lora with adaptive: moe is
    finetuning_type: lora_moe') or None. ConfigError for a value the key does not know, or a
    finetuning_type it does not refine."""
    note = None
    for key, table in METHOD_SELECTORS.items():
        value = getattr(finetune, key)
        if value is None:
            continue
        if value not in table:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(table)}; got '{value}'")
        refines, selects = table[value]
        if finetune.finetuning_type == refines:
            finetune.finetuning_type = selects
            note = f"finetuning_type: {refines} with {key}: {value} is finetuning_type: {selects}"
        elif finetune.finetuning_type != selects:
            raise ConfigError(f"config key '{key}' needs finetuning_type: {refines} or {selects} "
                              f"(got finetuning_type: {finetune.finetuning_type})")
    return note
