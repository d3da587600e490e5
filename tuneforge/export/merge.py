"""Merge the adapters into the base weights and write a plain HF directory (safetensors +
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no tuneforge installed.
Adapters that cannot be merged are refused before the work, offering export_format: adapter,
which writes the adapters themselves in peft's format (adapter.py).
A quantized base (quantization_bit) is dequantized first; export_quantization_bit quantizes the
merged weights with bitsandbytes and writes transformers' bitsandbytes format, which from_pretrained
loads as it is (quantized.py).

Order of work: everything that can be refused (export_dir, target.py; the format's limits:
architecture, tokenizer, quantization; free disk space) is checked before merging or writing;
then the merge; then the files, written beside export_dir and renamed into place (target.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from .. import adapters
from ..errors import ConfigError
from ..loading import load_for_use
from ..models import resolve_dtype, model_path, split_paths
from .adapter import export_adapters, refuse_unmergeable_files, refuse_unmergeable_layers
from .gguf import check_gguf, gguf_size, write_gguf
from .modelfile import write_modelfile
from .quantized import bitsandbytes_missing, bnb_config, dequantize_before_merge, quantization_error, quantize_saved
from .target import ExportTarget, check_export_dir, check_free_space, staged
from .tying import settle_tying, untie_adapted_embeddings


log = logging.getLogger("tuneforge")

def _sources(cfg) -> list[tuple[str, Path]]:
    """The folders the export reads, by config key: it must write none of them."""
    model = model_path(cfg.model)
    # a .gguf file's folder is not the model's: only the file is read, and a non-empty
    # export_dir (that folder itself) is refused anyway
    found = [("model_name_or_path", model)] if model.is_dir() else []
    found += [("adapter_name_or_path", Path(p).expanduser()) for p in split_paths(cfg.model.adapter_name_or_path)]
    return found


def export_model(cfg) -> Path:
    """Merge and write the export `cfg.export` describes; returns export_dir.

    Raises ConfigError for an export_dir it must not write (a file, a folder it reads, a
    non-empty folder no tuneforge export wrote, too little disk space) and for what the chosen
    format cannot express, all before merging; ModelError for a model or adapter that cannot be
    loaded; CheckpointError when writing fails (the previous export, if any, is kept)."""
    gguf = cfg.export.export_format == "gguf"
    if gguf and cfg.export.export_quantization_bit:
        raise ConfigError("export_quantization_bit is for export_format: hf; a gguf export takes "
                          "export_quantization (f16, q8_0, q4_0)")
    if not cfg.export.export_dir:
        raise ConfigError("config key 'export_dir' is required for `tuneforge export`")
    target = check_export_dir(cfg.export.export_dir, _sources(cfg))
    if cfg.export.export_format == "adapter":
        return export_adapters(cfg, target)
    bits = _requantization(cfg)  # its own checks, before the work
    paths = split_paths(cfg.model.adapter_name_or_path)
    refuse_unmergeable_files(paths)  # a method that can never merge, before anything loads
    dtype = None

    def before_adapters(model, tokenizer):
        """The format's limits and the disk space, checked on the base before any merge."""
        nonlocal dtype
        dtype = _export_dtype(cfg, model)
        if gguf:

            check_gguf(model, tokenizer, cfg.export.export_quantization)
            check_free_space(target, gguf_size(model, cfg.export.export_quantization))
        else:
            # a quantized export first writes the merged fp32 weights (removed after), then the quantized ones
            per_value = 4 + bits / 8 if bits else torch.empty(0, dtype=dtype).element_size()
            check_free_space(target, int(sum(p.numel() for p in model.parameters()) * per_value))
        # a quantized base cannot take a merge: back to fp32 first (every adapter then merges as usual)
        model = dequantize_before_merge(model)
        on_gpu = paths and cfg.export.export_device == "auto" and torch.cuda.is_available()
        return model.to("cuda") if on_gpu else model

    # merged in fp32, so the merged weights are exact before the final cast; with loftq_iter, a
    # LoftQ adapter's base is rebuilt from the fp weights (quantization waits for the adapter)
    ready = load_for_use(cfg, "export", before_adapters=before_adapters)
    model, tokenizer = ready.model, ready.tokenizer
    if paths:
        model = dequantize_before_merge(model)  # the LoftQ base attach_adapters built, if any
        refuse_unmergeable_layers(model)
        untied = untie_adapted_embeddings(model)
        model = adapters.unload(model, merge=True).to("cpu")
        settle_tying(model, untied)
        declare_biases(model)
        _check_declared(model)
    model.config.use_cache = True
    if gguf:
        return _export_gguf(cfg, model, tokenizer, target)
    if bits:
        return _export_quantized(cfg, model, tokenizer, dtype, target)
    model = model.to(dtype)
    with staged(target, "hf") as folder:
        model.save_pretrained(folder, max_shard_size=int(cfg.export.export_size * 10**9))
        tokenizer.save_pretrained(folder)
        write_modelfile(folder, None, tokenizer, cfg.generate.default_system)  # `ollama create` from it
    return target.shown


def _declared(model) -> set[str] | None:
    """The parameter names a model built from `model.config` has (None: it cannot be rebuilt)."""
    if getattr(model, "config", None) is None or not hasattr(type(model), "config_class"):
        return None
    try:
        with torch.device("meta"):
            return set(type(model)(model.config).state_dict())
    except Exception:  # a model class that cannot be rebuilt from its config: nothing to compare
        return None


def declare_biases(model) -> list[str]:
    """Biases a merge left on layers the config says have none (BitFit adds them) declared through
    the config's own switches (`attention_bias`, `mlp_bias`, ...: a `*_bias` flag that is false):
    a flag is set when it declares some of them; the layers it then declares without a bias get a
    zero one (adds nothing). Returns the flags set (logged); none when no flag fits (the check
    after it refuses)."""
    declared = _declared(model)
    if declared is None:
        return []
    state = model.state_dict()
    extra = {k for k in state if k not in declared}
    if not extra or not all(k.endswith(".bias") for k in extra):
        return []
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    flags = []
    for flag in [k for k, v in vars(config).items() if k.endswith("_bias") and v is False]:
        setattr(config, flag, True)
        now = _declared(model) or set()
        if extra & now and all(k.endswith(".bias") for k in now - set(state)):
            flags.append(flag)
            extra -= now
        else:
            setattr(config, flag, False)
    if extra or not flags:  # not all declared: put the flags back, the check refuses
        for flag in flags:
            setattr(config, flag, False)
        return []
    added = 0
    for key in sorted((_declared(model) or set()) - set(state)):
        layer = model.get_submodule(key.rsplit(".", 1)[0])
        weight = layer.weight
        layer.bias = torch.nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=False)
        added += 1
    more = f" (zero biases on {added} more layers)" if added else ""
    log.info("the merged model's added biases declared in its config: %s%s", ", ".join(f"{f}=true" for f in flags),
             more)
    return flags


def _check_declared(model) -> None:
    """ConfigError (before anything is written) when the merged model has parameters that a model
    built from its config lacks, e.g. a bias an adapter method added to a layer without one: the
    written folder would load without them and compute something else."""
    declared = _declared(model)
    if declared is None:
        return
    extra = [k for k in model.state_dict() if k not in declared]
    if extra:
        raise ConfigError(
            f"the merged model has {len(extra)} parameter(s) its config does not declare (e.g. {extra[0]}; "
            "BitFit adds a bias to layers that have none), which a saved model would lose; serve the "
            "adapter unmerged (tuneforge chat / api load it) or train it on layers that have biases")


def _export_dtype(cfg, model) -> torch.dtype:
    if cfg.export.export_dtype == "auto":
        declared = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        return declared if isinstance(declared, torch.dtype) else resolve_dtype(str(declared or "float32"))
    return resolve_dtype(cfg.export.export_dtype)


def _requantization(cfg) -> int | None:
    """export_quantization_bit (4 or 8), or None; ConfigError when bitsandbytes is missing."""
    bits = cfg.export.export_quantization_bit
    if bits and bitsandbytes_missing():
        raise ConfigError(bitsandbytes_missing())
    return bits or None


def _export_gguf(cfg, model, tokenizer, target: ExportTarget) -> Path:
    """export_format gguf: <export_dir>/<name>.<quantization>.gguf plus an Ollama Modelfile."""

    quantization = cfg.export.export_quantization
    name = f"{target.real.name}.{quantization}.gguf"
    with staged(target, "gguf") as folder:
        write_gguf(model, tokenizer, folder / name, quantization)
        write_modelfile(folder, name, tokenizer, cfg.generate.default_system)
    return target.shown


def _export_quantized(cfg, model, tokenizer, dtype: torch.dtype, target: ExportTarget) -> Path:
    """export_quantization_bit: the merged fp32 weights (not a cast of them), written once in full
    precision and loaded back by transformers with a BitsAndBytesConfig (bitsandbytes quantizes the
    Linear layers but the output head), saved with save_pretrained: the folder holds transformers'
    bitsandbytes serialisation, and from_pretrained(export_dir) loads the same quantized weights.
    quantization_type, double_quantization and compute_dtype (auto: the export dtype) choose the
    4-bit format; the error against the merged weights is printed."""
    m, bits = cfg.model, cfg.export.export_quantization_bit
    compute = dtype if m.compute_dtype == "auto" else resolve_dtype(m.compute_dtype)
    quantization = bnb_config(bits, m.quantization_type, m.double_quantization, compute)
    merged = {path: mod.weight for path, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    describe = "int8 (LLM.int8, one scale per row)" if bits == 8 else \
        f"4-bit {m.quantization_type}" + (" with 8-bit scales" if m.double_quantization else "")
    with staged(target, "hf") as folder:
        full = folder / ".merged-float32"
        model.to(torch.float32).save_pretrained(full)
        quantized = quantize_saved(full, quantization, dtype)
        quantization_error(quantized, merged, describe)
        quantized.save_pretrained(folder, max_shard_size=int(cfg.export.export_size * 10**9))
        shutil.rmtree(full)
        tokenizer.save_pretrained(folder)
    log.info("no Ollama Modelfile beside a bitsandbytes export (Ollama does not read bitsandbytes weights); "
             "export_format: gguf with export_quantization: q4_0 or q8_0 writes a quantized model for Ollama")
    return target.shown
