"""Checks on a model as transformers built and loaded it, each failure one `ModelError` line:
a config.json transformers cannot build a model from, or whose model_type is not a causal
language model; weight files that do not cover the model (missing, reshaped or misplaced
tensors, which transformers would otherwise initialise randomly or drop); weights holding NaN
or inf. Imports torch and transformers only inside the functions that need them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import ModelError, TuneforgeError
from .fileio import one_line, quoted

log = logging.getLogger(__name__)


def config_fault(path: Path, trust_remote_code: bool = False) -> ModelError | None:
    """The one line naming config.json when transformers cannot build a model from that file
    alone (on the meta device: no memory, no weights read), else None."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        return ModelError(f"model config {quoted(path / 'config.json')} does not describe a model "
                          f"transformers can build ({type(exc).__name__}: {one_line(exc, 200)}); "
                          "fix or replace config.json")
    return None


def check_causal_lm(config, path: Path) -> None:
    """Refuse, before any weight is read, a config.json whose model_type has no causal language
    model class (an encoder-decoder, a vision or audio model): ModelError naming the file."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return  # remote code brings its own class
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"model config {quoted(path / 'config.json')} describes a "
                         f"{getattr(config, 'model_type', '?')!r} model, which is not a causal language "
                         "model (transformers has no AutoModelForCausalLM class for it); tuneforge "
                         "fine-tunes and chats with causal (decoder) language models")


def check_model_class(config, path: Path, model_class: str) -> None:
    """Refuse, before any weight is read, a config.json whose model_type has no class of the
    transformers Auto class `model_class` (e.g. "AutoModelForSequenceClassification"): ModelError
    naming the file and the class."""
    import transformers

    if model_class == "AutoModelForCausalLM":
        check_causal_lm(config, path)
        return
    mapping = getattr(getattr(transformers, model_class), "_model_mapping", None)
    if mapping is not None and model_class not in (getattr(config, "auto_map", None) or {}) \
            and type(config) not in mapping:
        raise ModelError(f"model config {quoted(path / 'config.json')} describes a "
                         f"{getattr(config, 'model_type', '?')!r} model, for which transformers has no "
                         f"{model_class} class; pick a model of another architecture")


# quantization_config.quant_method values of pre-quantized checkpoints -> what loading them needs
PREQUANTIZED = {
    "gptq": "optimum and gptqmodel",
    "awq": "gptqmodel (AutoAWQ's format)",
    "aqlm": "aqlm",
    "eetq": "eetq (CUDA)",
    "hqq": "hqq",
    "quanto": "optimum-quanto",
    "fbgemm_fp8": "fbgemm-gpu (CUDA)",
    "fp8": "a CUDA GPU with FP8",
    "compressed-tensors": "compressed-tensors",
    "higgs": "flute-kernel (CUDA)",
    "vptq": "vptq (CUDA)",
    "spqr": "spqr_quant (CUDA)",
    "bitnet": "a BitNet kernel",
    "torchao": "torchao",
}


def check_prequantized(config, path: Path) -> None:
    """Refuse, before any weight is read, a checkpoint already quantized by a method whose layers
    tuneforge's adapters cannot wrap (GPTQ, AWQ, AQLM, ...): ModelError naming the method, what
    transformers would need, and what to do. Checkpoints quantized with bitsandbytes load."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return
    method = str((quant if isinstance(quant, dict) else getattr(quant, "to_dict", lambda: {})()).get(
        "quant_method", getattr(quant, "quant_method", "")) or "")
    method = getattr(method, "value", method)
    if method.lower() in PREQUANTIZED:
        raise ModelError(
            f"model {quoted(path)} is already quantized with {method} (quantization_config in config.json); "
            f"loading it needs {PREQUANTIZED[method.lower()]}, and tuneforge's adapters cannot train or merge "
            f"its layers: use the unquantized model (with quantization_bit: 4 for QLoRA) instead")


def new_head_modules(model, loading_info: dict) -> list[str]:
    """The modules of a task model (a classifier built on a base checkpoint) that its weight files
    hold nothing like: every tensor of the module is missing and no tensor of that kind (layer
    numbers aside) was read, e.g. BERT's `classifier` and, for sentence-transformers checkpoints,
    `bert.pooler.dense`. They are new (randomly initialised), not damage; their names are returned
    and their keys taken out of loading_info["missing_keys"] (check_loaded_weights judges the rest)."""
    missing = set(loading_info["missing_keys"])
    loaded = {_layer_pattern(name) for name in model.state_dict() if name not in missing}
    new = sorted({name.rsplit(".", 1)[0] for name in missing if _layer_pattern(name) not in loaded})
    whole = [m for m in new if not any(k.startswith(m + ".") and _layer_pattern(k) in loaded
                                       for k in model.state_dict())]
    loading_info["missing_keys"] = {k for k in missing if k.rsplit(".", 1)[0] not in whole}
    return whole


def check_loaded_weights(model, loading_info: dict, path: Path) -> None:
    """Refuse a model its weight files do not cover: weights missing from the files (transformers
    would initialise them randomly), tensors of another shape, or tensors of the model's own kind
    that it has no place for (config.json says fewer layers than the files hold). What transformers
    itself lets pass (tied weights, non-persistent buffers, keys the model class ignores) is
    already left out of `loading_info`. Other unknown tensors are ignored with a warning.

    Raises ModelError: one line naming the folder, the counts and the first of each kind."""
    missing, unexpected = set(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    mismatched = {name: (tuple(found), tuple(wanted)) for name, found, wanted in loading_info["mismatched_keys"]}
    order = list(model.state_dict())
    own = {_layer_pattern(name) for name in order}
    if not missing and not mismatched and not any(_layer_pattern(name) in own for name in unexpected):
        if unexpected:
            log.warning("%s: %d tensor(s) in its weight files are not part of %s and are ignored "
                        "(first: %s)", quoted(path), len(unexpected), type(model).__name__, unexpected[0])
        return
    parts = []
    if mismatched:
        name = next(n for n in order if n in mismatched)
        found, wanted = mismatched[name]
        parts.append(f"{_count(len(mismatched), 'tensor')} of another shape (first: {name} is "
                     f"{found} in the files, {wanted} in the model)")
    if missing:
        parts.append(f"{_count(len(missing), 'weight')} missing from the files (first: "
                     f"{next(n for n in order if n in missing)})")
    if unexpected:
        parts.append(f"{_count(len(unexpected), 'tensor')} in the files that the model has no "
                     f"place for (first: {unexpected[0]})")
    model_type = getattr(model.config, "model_type", "?")
    raise ModelError(f"the weights in {quoted(path)} do not fit its config.json ({type(model).__name__}, "
                     f"model_type {model_type!r}): {', '.join(parts)}; the weight files are incomplete, or they "
                     "and config.json come from different models: download, copy or save the model again")


def _layer_pattern(name: str) -> str:
    """A tensor name with its layer numbers blanked: model.layers.#.mlp.down_proj.weight."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_finite(tensors, where: str, error: type[TuneforgeError] = ModelError) -> None:
    """Refuse weights holding NaN or inf: `tensors` are (name, tensor) pairs, `where` names their
    file or folder in the message ("model file 'm/model.safetensors'").

    One pass: a float32 sum per tensor (NaN and inf survive summing) screens them, and only a
    tensor whose sum is not finite is counted element by element, so finite weights too large to
    sum are not mistaken for damage. Raises `error`: one line naming the first bad tensor, how
    many of its values are bad, and how many other tensors are."""
    import torch

    bad = []
    with torch.no_grad():
        for name, tensor in tensors:
            if (tensor.is_floating_point() and tensor.device.type != "meta"
                    and not torch.isfinite(tensor.sum(dtype=torch.float32))):
                count = int((~torch.isfinite(tensor)).sum())
                if count:
                    bad.append((name, tensor, count))
    if not bad:
        return
    name, tensor, count = bad[0]
    kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
    more = f"; {len(bad) - 1} more tensor(s) hold NaN or inf too" if len(bad) > 1 else ""
    fix = "the weights are damaged: download, copy or save them again"
    if kind == "inf" and tensor.dtype == torch.float16:
        fix = ("its values exceed float16's range (65504): load it in bfloat16 or float32 "
               "(infer_dtype, or bf16 instead of fp16 for training)")
    raise error(f"{where} holds {kind} in {name} ({count} of {tensor.numel()} values{more}); {fix}")
