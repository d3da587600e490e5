"""Adapters that cannot be merged, and `export_format: adapter`, for every method.

A merged export (hf, gguf) needs every adapter of adapter_name_or_path folded into the weights.
Whether a method can be merged is asked generically, twice: from each adapter's
adapter_config.json before anything is loaded (`AdapterMethod.cannot_merge(config)`: a
nonlinearity, extra tokens), and from the attached layers after loading
(`AdapterLayer.cannot_merge()`: what depends on the layer). Either refusal is one ConfigError
line naming the adapter, its method and why, and offering `export_format: adapter`.

`export_format: adapter` writes the adapters themselves, loaded onto the base model and saved
again in peft's format (adapter_config.json + adapter_model.safetensors, fp32): one adapter
straight into export_dir, several into export_dir/<adapter folder name>/ each. Like every export
it is built beside export_dir and renamed into place (target.py), and never writes over a folder
that a tuneforge export did not write.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import adapters
from ..adapters.core import adapter_layers
from ..adapters.methods import method_named, method_of_config
from ..adapters.peft_format import CONFIG_NAME, check_adapter_dir, config_from_peft
from ..errors import ConfigError, ModelError
from ..fileio import read_json
from ..loading import load_for_use
from ..models import split_paths
from .target import ExportTarget, staged

OFFER = "export it as an adapter instead (export_format: adapter)"


def _read_config(path: str):
    """(adapter_config.json as a dict, the method's config) of the adapter folder `path`."""
    cfg_file = check_adapter_dir(path) / CONFIG_NAME
    raw = read_json(cfg_file, "adapter config", ModelError)
    return raw, config_from_peft(raw, f"adapter config '{cfg_file}'")


def refuse_unmergeable_files(paths: list[str]) -> None:
    """ConfigError (one line) for the first adapter whose method can never be merged, read from its
    adapter_config.json; nothing is loaded."""
    for path in paths:
        _, cfg = _read_config(path)
        method = method_of_config(cfg)
        why = method.cannot_merge(cfg) if method.cannot_merge is not None else None
        if why:
            label = method.label or method.name
            article = "an" if label[:1] in "AEIO" else "a"  # a UniPELT, an IA3
            raise ConfigError(f"adapter '{path}' is {article} {label} adapter, which cannot be "
                              f"merged into the model: {why}; {OFFER}")


def refuse_unmergeable_layers(model: torch.nn.Module) -> None:
    """ConfigError (one line) for the first attached adapter layer that says it cannot be merged."""
    for path, layer in adapter_layers(model):
        why = layer.cannot_merge()
        if why:
            try:
                label = method_named(layer.method_name).label or layer.method_name
            except ConfigError:  # a model-level holder (virtual tokens), not a method of its own
                label = layer.method_name.replace("_", "-")
            raise ConfigError(f"cannot merge the {label} adapter into {path}: {why}; {OFFER}")


def export_adapters(cfg, target: ExportTarget) -> Path:
    """export_format adapter: every adapter of adapter_name_or_path, loaded onto the base and
    written again in peft's format into export_dir (several: one subfolder per adapter folder name)."""
    paths = split_paths(cfg.model.adapter_name_or_path)
    if not paths:
        raise ConfigError("export_format: adapter writes the adapters of adapter_name_or_path; set it to "
                          "the adapter folder(s) to export")
    if cfg.export.export_quantization_bit:
        raise ConfigError("export_quantization_bit is for export_format: hf; an adapter export writes the "
                          "adapters' own fp32 tensors")
    declared = {p: _read_config(p)[0].get("base_model_name_or_path") for p in paths}
    ready = load_for_use(cfg, "serve", dtype=torch.float32)  # each adapter under its own name, none merged
    with staged(target, "adapter") as folder:
        for public, name in ready.served.items():
            path = next(p for p in paths if Path(p).name == public)
            out = folder if len(paths) == 1 else folder / public
            adapters.save_adapter(ready.model, out, name=name, base_model_name_or_path=declared[path])
    return target.shown
