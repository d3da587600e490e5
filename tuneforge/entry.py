"""The three calls of the public API that run a whole workflow: `tuneforge.train`,
`tuneforge.evaluate`, `tuneforge.export`, each taking a Config, a YAML path or a dict of keys.

`tuneforge.train` and `tuneforge.export` share their names with the packages tuneforge/train/ and
tuneforge/export/. Importing such a package (`from tuneforge.train.reward import ...`) makes
Python set the package as that attribute of tuneforge, over the function, so each of the two
packages is made callable with `callable_package`: `tuneforge.train(config)` then works whichever
of the two the attribute holds. Importing this module imports nothing heavy (no torch)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def _as_config(config):
    from .config import Config, load_config

    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return load_config(None, config)
    return load_config(config)


def train(config) -> dict:
    """Fine-tune from a Config, a YAML path or a dict of keys; returns the metrics. Raises what
    `tuneforge.workflows.train` raises (ConfigError, DataError, ModelError, CheckpointError, ...)."""
    from .workflows import train as _train

    return _train(_as_config(config))


def evaluate(config, limit: int | None = None) -> dict:
    """Eval loss/perplexity (and with do_predict, generated answers scored by ROUGE/BLEU)."""
    from .workflows import evaluate as _evaluate

    return _evaluate(_as_config(config), limit=limit)


def export(config):
    """Merge adapters and write a Hugging Face model folder (or a .gguf file, or the adapters);
    returns its path."""
    from .workflows import export as _export

    return _export(_as_config(config))


def callable_package(module_name: str, function: Callable) -> None:
    """Make the (already imported) package `module_name` callable as `function`."""

    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    CallablePackage.__call__.__doc__ = function.__doc__
    sys.modules[module_name].__class__ = CallablePackage
