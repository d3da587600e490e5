"""Save a quantized model as it is (4/8-bit codes) and load it back without fp weights.

A directory written by `save_quantized` holds (names no Hugging Face loader takes for its own:
with a config.json, from_pretrained would build the model and fill every quantized projection with
random weights, a silent wrong answer; without one it refuses the folder):
  tuneforge_config.json       the model's HF config, with no `quantization_config` (transformers
                              would hand the model to one of its own quantizers)
  tuneforge_quantized.safetensors  the state dict: QuantLinear codes (qweight, absmax, nested_absmax,
                              absmax_offset) beside the plain tensors; a tied weight is stored once
  tuneforge_quantization.json format version, QuantizationConfig, each quantized module's
                              settings, and which tensors are tied to which
  generation_config.json, tokenizer files when present
Folders of format_version 1 (config.json, model.safetensors) are still read.

`load_quantized` builds the architecture on the meta device, puts empty QuantLinear shells where
the codes go and assigns the file's tensors to them: no fp weight is ever materialised, and the
loaded model computes exactly what the saved one did. safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import CheckpointError, ConfigError, ModelError
from tuneforge.fileio import read_json, replace_folder
from tuneforge.weightfiles import load_model_config, load_safetensors

from . import backends
from .linear import QuantLinear
from .model import QuantizationConfig, _compute_dtype, _replace, quantization_of

FORMAT_VERSION = 2
META_NAME = "tuneforge_quantization.json"
WEIGHTS_NAME = "tuneforge_quantized.safetensors"
CONFIG_NAME = "tuneforge_config.json"
FILE_NAMES = {1: ("config.json", "model.safetensors"), 2: (CONFIG_NAME, WEIGHTS_NAME)}  # per format_version


# ---- save -----------------------------------------------------------------------------------------
def _layer_spec(m: QuantLinear) -> dict:
    return {"bits": m.bits, "quant_type": m.quant_type, "blocksize": m.blocksize, "double_quant": m.double_quant}


def _untied_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with each shared tensor once, {dropped name: kept name})."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ModelError(f"cannot save {name}: it is on the meta device (never loaded)")
        # same storage, offset, shape and strides: the same tensor under two names
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors, tied


def _hf_config(model: nn.Module):
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    return config


def save_quantized(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write `model` (quantized by tuneforge.quant) to `directory` in its quantized form.

    The directory is written next to its final place and renamed into it, so an error leaves no
    half-written output, and a model already there stays as it was until the new one is complete.
    """
    from safetensors.torch import save_file

    if any(callable(getattr(m, "adapter_names", None)) for m in model.modules()):
        raise ModelError("save_quantized: the model carries adapters; save them with save_adapter "
                         "(or merge them after dequantize_model) and save the base alone")
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise ModelError(f"save_quantized needs a transformers model (with .config), got {type(model).__name__}")
    layers = {path: _layer_spec(m) for path, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ModelError("save_quantized: the model has no quantized layers; use save_pretrained, "
                         "or quantize_model first")
    cfg = quantization_of(model)
    out = Path(directory)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / META_NAME).is_file()):
        raise CheckpointError(f"'{out}' is a file or a non-empty folder that holds no model; "
                              "choose an empty or new folder")
    tensors, tied = _untied_state_dict(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "quantization_config": cfg.to_dict(),
        "quantized_modules": layers,
        "tied_weights": tied,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _hf_config(model).save_pretrained(tmp)
        (tmp / "config.json").rename(tmp / CONFIG_NAME)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "tuneforge_quantized": "1"})
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # the metadata goes last: a directory that has it is complete
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- load -----------------------------------------------------------------------------------------
def _read_meta(directory: Path) -> dict:
    path = directory / META_NAME
    if not path.is_file():
        raise ModelError(f"'{directory}' has no {META_NAME}: not a model saved by tuneforge.quant.save_quantized")
    meta = read_json(path, "quantization record", ModelError)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in FILE_NAMES:
        raise ModelError(f"{path}: format_version {version!r} is not one this tuneforge reads "
                         f"({', '.join(map(str, FILE_NAMES))}); save it again, or upgrade tuneforge")
    for key, kind in (("quantization_config", dict), ("quantized_modules", dict), ("tied_weights", dict)):
        if not isinstance(meta.get(key), kind):
            raise ModelError(f"{path}: '{key}' is missing or not a {kind.__name__}; the file is damaged")
    return meta


def _read_tensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelError(f"'{path.parent}' has no {path.name}")
    return load_safetensors(path, "quantized model file", device=str(device))


def _empty_model(directory: Path, config_name: str):
    """The architecture from its config file: parameters on meta, buffers like inv_freq real."""
    import transformers
    from accelerate import init_empty_weights

    config = load_model_config(directory, config_name=config_name)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights():
        if cls is not None:
            return cls(config)
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ModelError(f"{directory / config_name}: unknown architecture {arch!r} ({exc})") from None


def _shell(linear: nn.Module, path: str, spec: dict, cfg: QuantizationConfig, device) -> QuantLinear:
    if not isinstance(linear, nn.Linear):
        raise ModelError(f"quantized module '{path}' is a {type(linear).__name__} in this architecture, "
                         "not a Linear; the files do not belong together")
    try:
        bits, quant_type = int(spec["bits"]), str(spec["quant_type"])
        blocksize, double_quant = int(spec["blocksize"]), bool(spec["double_quant"])
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{META_NAME}: settings of '{path}' are incomplete ({spec!r})") from None
    return QuantLinear(
        linear.in_features, linear.out_features, linear.bias is not None, bits, quant_type, blocksize,
        double_quant, _compute_dtype(cfg.compute_dtype, device), backends.resolve(cfg.backend, device, bits),
        device="meta",
    )


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ModelError(f"{source}: tensors do not fit the architecture of its config ({what})")
    quant = {f"{p}.{b}" for p, m in model.named_modules() if isinstance(m, QuantLinear) for b, _ in m.named_buffers()}
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise ModelError(f"{source}: tensor '{name}' has shape {tuple(got.shape)}, "
                             f"the model needs {tuple(want.shape)}")
        if name in quant and got.dtype != want.dtype:
            raise ModelError(f"{source}: tensor '{name}' is {got.dtype}, quantized codes need {want.dtype}")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def load_quantized(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model `save_quantized` wrote, on `device`, its Linear layers still quantized.

    Raises ModelError (one line naming the file) for a missing folder or file, an unreadable or
    malformed record or config, and weights that are truncated, not safetensors or do not fit."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"quantized model directory '{directory}' does not exist")
    meta = _read_meta(directory)
    try:
        cfg = QuantizationConfig(**meta["quantization_config"])
    except (ConfigError, TypeError) as exc:
        raise ModelError(f"{directory / META_NAME}: bad quantization_config ({exc})") from None
    config_name, weights_name = FILE_NAMES[meta["format_version"]]
    tensors = _read_tensors(directory / weights_name, device)
    model = _empty_model(directory, config_name)
    for path, spec in meta["quantized_modules"].items():
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise ModelError(f"{META_NAME}: quantized module '{path}' does not exist in the architecture "
                             f"of {config_name}") from None
        _replace(model, path, _shell(linear, path, spec, cfg, device))
    tied = meta["tied_weights"]
    for dropped, kept in tied.items():
        if kept not in tensors:
            raise ModelError(f"{META_NAME}: '{dropped}' is tied to '{kept}', which the weights file lacks")
        tensors[dropped] = tensors[kept]
    _check_tensors(model, tensors, directory / weights_name)
    model.load_state_dict(tensors, strict=True, assign=True)
    for dropped, kept in tied.items():  # one tensor object again, as before saving
        (dst, dst_attr), (src, src_attr) = _owner(model, dropped), _owner(model, kept)
        slot = "_parameters" if src_attr in src._parameters else "_buffers"
        getattr(dst, slot)[dst_attr] = getattr(src, slot)[src_attr]
    model.to(device)  # the buffers init_empty_weights kept real are still on the CPU
    model.tuneforge_quantization = cfg
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{directory / 'generation_config.json'}: {exc}") from None
    return model.eval()
