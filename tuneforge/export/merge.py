"""Merge the adapters into the base weights and write a plain HF directory (safetensors +
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no tuneforge installed.
A quantized base (quantization_bit) is dequantized first; export_quantization_bit requantizes the
merged weights and writes tuneforge's quantized format instead (quantized.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import adapters
from ..data import apply_template
from ..errors import ConfigError
from ..models import attach_adapters, load_model_and_tokenizer, resolve_dtype, split_paths
from ..quant.model import cast_unquantized
from .quantized import dequantize_before_merge, requantize


def export_model(cfg) -> Path:
    out = cfg.export.export_dir
    if not out:
        raise ConfigError("config key 'export_dir' is required for `tuneforge export`")
    out = Path(out)
    gguf = cfg.export.export_format == "gguf"
    if gguf and cfg.export.export_quantization_bit:
        raise ConfigError("export_quantization_bit is for export_format: hf; a gguf export takes "
                          "export_quantization (f16, q8_0, q4_0)")
    previous = "Modelfile" if gguf else "config.json"  # a folder we wrote before may be replaced
    if out.is_dir() and any(out.iterdir()) and not (out / previous).is_file():
        raise ConfigError(f"export_dir '{out}' is not empty and holds no model; choose an empty "
                          "or new folder")
    # merge in fp32, so the merged weights are exact before the final cast
    paths = split_paths(cfg.model.adapter_name_or_path)
    # loftq_iter: quantization waits for the adapter, whose LoftQ base is rebuilt from the fp weights
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, dtype=torch.float32, defer_quantization=bool(cfg.finetune.loftq_iter and paths))
    # a quantized base cannot take a merge: back to fp32 first (every adapter then merges as usual)
    model = dequantize_before_merge(model)
    if paths:
        on_gpu = cfg.export.export_device == "auto" and torch.cuda.is_available()
        model = attach_adapters(model.to("cuda") if on_gpu else model, paths, trainable=False)
        model = dequantize_before_merge(model)  # the LoftQ base attach_adapters built, if any
        model = adapters.unload(model, merge=True).to("cpu")
    apply_template(tokenizer, cfg.data.template)
    if cfg.export.export_dtype == "auto":
        declared = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        dtype = declared if isinstance(declared, torch.dtype) else resolve_dtype(str(declared or "float32"))
    else:
        dtype = resolve_dtype(cfg.export.export_dtype)
    model.config.use_cache = True
    if gguf:
        return _export_gguf(cfg, model, tokenizer, out)
    if cfg.export.export_quantization_bit:
        return _export_quantized(cfg, model, tokenizer, dtype, out)
    model = model.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=int(cfg.export.export_size * 10**9))
        tokenizer.save_pretrained(tmp)
        _readable_like_new_files(tmp)
        if out.exists():
            shutil.rmtree(out)  # a previous export (it has config.json): replace it whole
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _readable_like_new_files(folder: Path) -> None:
    """mkdtemp makes a private folder (and some writers private files); the export is meant to be
    shared (e.g. with an inference server running as another user), so apply the umask as a
    plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _export_gguf(cfg, model, tokenizer, out: Path) -> Path:
    """export_format gguf: <export_dir>/<name>.<quantization>.gguf plus an Ollama Modelfile."""
    from .gguf import write_gguf
    from .modelfile import write_modelfile

    quantization = cfg.export.export_quantization
    name = f"{out.name}.{quantization}.gguf"
    for old in out.glob("*.gguf") if out.is_dir() else []:
        old.unlink()  # a previous export's file, perhaps of another quantization
    write_gguf(model, tokenizer, out / name, quantization)
    write_modelfile(out, name, tokenizer, cfg.generate.default_system)
    return out


def _export_quantized(cfg, model, tokenizer, dtype: torch.dtype, out: Path) -> Path:
    """export_quantization_bit: quantize the merged fp32 weights (not a cast of them) and write
    tuneforge's quantized format (tuneforge.quant.load_quantized reads it)."""
    from ..quant import QuantizationConfig, save_quantized

    m = cfg.model
    qcfg = QuantizationConfig(
        bits=cfg.export.export_quantization_bit, quant_type=m.quantization_type,
        double_quant=m.double_quantization, compute_dtype=m.compute_dtype, backend=m.quantization_backend,
    )
    requantize(model, qcfg)
    cast_unquantized(model, dtype)
    return save_quantized(model, out, tokenizer)
