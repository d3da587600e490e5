"""tuneforge: fine-tune large language models with LoRA and other parameter-efficient methods."""

__version__ = "0.1.0"

from .adapters import (  # noqa: E402  (re-exports: the public adapter API)
    LoraConfig,
    add_adapter,
    delete_adapter,
    disable_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from .config import Config, load_config  # noqa: E402
from .errors import TuneforgeError  # noqa: E402


def train(config):
    """Fine-tune from a Config, a YAML path or a dict of keys; returns the metrics."""
    from .workflows import train as _train

    return _train(_as_config(config))


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return load_config(None, config)
    return load_config(config)


__all__ = [
    "LoraConfig", "add_adapter", "delete_adapter", "disable_adapters", "load_adapter",
    "merge_adapters", "save_adapter", "set_active_adapters", "trainable_parameters", "unload",
    "unmerge_adapters", "Config", "load_config", "TuneforgeError", "train", "__version__",
]
