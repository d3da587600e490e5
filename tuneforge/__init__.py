"""tuneforge: fine-tune large language models with LoRA and other parameter-efficient methods.

The public API is re-exported here lazily, so `import tuneforge` (and the CLI's `--help`) does
not pay for importing torch until something needs it."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


def _quiet_bitsandbytes() -> None:
    # bitsandbytes' CPU backend warns at import that an optional gemv kernel (from the `kernels`
    # package) is missing; only its own Linear4bit inference uses it, tuneforge never does
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage())


_quiet_bitsandbytes()


def _short_openmp_spin() -> None:
    # before torch starts its OpenMP pool: threads spin only briefly at each region's end, then
    # sleep, so training beside another busy process is not many times slower (tuneforge/threads.py)
    from .threads import prefer_short_spin

    prefer_short_spin()


_short_openmp_spin()

_EXPORTS = {
    "LoraConfig": "adapters", "add_adapter": "adapters", "delete_adapter": "adapters",
    "IA3Config": "adapters.ia3", "LoraEnsembleConfig": "adapters.lora_ensemble",
    "LoraDynamicConfig": "adapters.lora_dynamic", "set_dynamic_rank": "adapters.lora_dynamic",
    "LoraMultitaskConfig": "adapters.lora_multitask",
    "LoHaConfig": "adapters.loha", "LoKrConfig": "adapters.lokr",
    "AdaLoraConfig": "adapters.adalora", "LoraMoeConfig": "adapters.lora_moe",
    "LNTuningConfig": "adapters.ln_tuning", "VeraConfig": "adapters.vera",
    "BitFitConfig": "adapters.bitfit",
    "OFTConfig": "adapters.oft", "BOFTConfig": "adapters.boft",
    "PromptTuningConfig": "adapters.prompt_tuning", "PrefixTuningConfig": "adapters.prefix_tuning",
    "PromptEncoderConfig": "adapters.p_tuning",
    "BottleneckConfig": "adapters.bottleneck",
    "MamConfig": "adapters.mam", "UniPeltConfig": "adapters.unipelt",
    "disable_adapters": "adapters", "load_adapter": "adapters", "merge_adapters": "adapters",
    "save_adapter": "adapters", "set_active_adapters": "adapters",
    "trainable_parameters": "adapters", "unload": "adapters", "unmerge_adapters": "adapters",
    "combine_adapters": "adapters", "route_adapters": "adapters",
    "Config": "config", "load_config": "config", "TuneforgeError": "errors",
    "load_model_and_tokenizer": "models",
    "quantize_model": "quant", "dequantize_model": "quant", "QuantizationConfig": "quant",
}

__all__ = [*_EXPORTS, "train", "evaluate", "export", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'tuneforge' has no attribute '{name}'")


from .entry import evaluate, export, train  # noqa: E402 - after the lazy table; torch-free
