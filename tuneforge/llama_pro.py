"""LLaMA Pro: block expansion, then training only the new blocks (LLaMA-Factory's
`scripts/llama_pro.py` and `use_llama_pro`).

Expansion (`python -m tuneforge.llama_pro --model_name_or_path M --output_dir D --num_expand N`,
LLaMA-Factory's arguments) writes a model folder with N more decoder blocks: after every
num_layers / N original blocks comes a copy of the block before it whose attention output
(o_proj) and MLP output (down_proj) weights and biases are zero, so each new block adds nothing
to the residual stream and the expanded model computes exactly what the original does until it
trains. The tokenizer is copied beside it.

Training (`use_llama_pro: true` with `freeze_trainable_layers: N`): only the expanded blocks
train, which sit at positions stride - 1, 2 * stride - 1, ... where stride = layers / N
(train/methods.py asks `expanded_blocks`); with `finetuning_type: freeze` they train in full
(freeze_trainable_modules narrows them as usual), with `lora` the adapters go on their linear
layers only (`expanded_targets`)."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import torch

from .errors import ConfigError, TuneforgeError

log = logging.getLogger("tuneforge")
ZEROED = ("o_proj", "down_proj")  # the blocks' output projections (Llama, Mistral, Qwen2, Yi, ...)


def expanded_blocks(layers: list, n: int) -> list:
    """The expanded blocks among a LLaMA Pro model's decoder `layers`, `n` of them
    (freeze_trainable_layers). Raises ConfigError when n does not divide the layers."""
    if n <= 0 or len(layers) % n:
        raise ConfigError(f"config key 'freeze_trainable_layers' ({n}) must divide the model's {len(layers)} "
                          "layers with use_llama_pro: set it to the num_expand the model was expanded with")
    stride = len(layers) // n
    chosen = [layers[i] for i in range(stride - 1, len(layers), stride)]
    fresh = sum(all(not p.any() for name, p in layer.named_parameters() if any(z in name for z in ZEROED))
                for layer in chosen)
    if fresh < len(chosen):
        log.info("use_llama_pro: %d of the %d blocks trained do not start as fresh expansions (zero o_proj / "
                 "down_proj): a model trained before, or not expanded by tuneforge.llama_pro", len(chosen) - fresh,
                 len(chosen))
    return chosen


def expanded_targets(model, targets, n: int) -> list[str]:
    """LoRA on a LLaMA Pro model (LLaMA-Factory's find_expanded_modules): the full names of the
    linear modules `targets` names ('all-linear' or a list of names / suffixes) inside the
    expanded blocks only. Raises ConfigError when none is found."""
    from .adapters.targets import linear_types, output_head_name

    where, layers = _decoder_layers(model)
    chosen = {id(layer) for layer in expanded_blocks(list(layers), n)}
    head = output_head_name(model)
    names = []
    for index, layer in enumerate(layers):
        if id(layer) not in chosen:
            continue
        for name, module in layer.named_modules():
            full = f"{where}.{index}.{name}"
            if not name or full == head or not isinstance(module, linear_types()):
                continue
            if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in (targets or [])):
                names.append(full)
    if not names:
        raise ConfigError(f"config key 'lora_target' ({targets}) names no linear layer of the expanded blocks "
                          "(use_llama_pro); use all or module names such as q_proj,v_proj")
    return names


def _decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ConfigError("llama_pro: the model's decoder layers were not found (no list of num_hidden_layers "
                      "blocks); block expansion needs a Llama-like model")


def expand_model(model, num_expand: int) -> None:
    """Insert `num_expand` zero-output copies into `model`'s decoder layers, in place (config
    updated: num_hidden_layers, and layer_types where the model lists one per layer)."""
    where, layers = _decoder_layers(model)
    total = len(layers)
    if num_expand <= 0 or total % num_expand:
        raise ConfigError(f"llama_pro: --num_expand ({num_expand}) must divide the model's {total} layers")
    split = total // num_expand
    config = model.config
    types = list(getattr(config, "layer_types", None) or [])
    new_layers, new_types = [], []
    for i, layer in enumerate(layers):
        new_layers.append(layer)
        new_types += types[i:i + 1]
        if (i + 1) % split:
            continue
        block = copy.deepcopy(layer)
        zeroed = [p for name, p in block.named_parameters() if any(z in name.split(".") for z in ZEROED)]
        if not zeroed:
            raise ConfigError(f"llama_pro: the model's decoder blocks have no {' / '.join(ZEROED)} layers to zero "
                              "(block expansion is for Llama, Mistral, Qwen2, Yi and alike)")
        with torch.no_grad():
            for p in zeroed:
                p.zero_()
        new_layers.append(block)
        new_types += types[i:i + 1]
    for index, layer in enumerate(new_layers):  # attention caches are per layer index
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    parent, _, attribute = where.rpartition(".")
    setattr(model.get_submodule(parent), attribute, torch.nn.ModuleList(new_layers))
    config.num_hidden_layers = len(new_layers)
    if types:
        config.layer_types = new_types


def block_expansion(model_name_or_path: str, output_dir: str, num_expand: int) -> Path:
    """Expand the model at `model_name_or_path` (folder, hub id or empty for the default model)
    by `num_expand` blocks into `output_dir` (weights in the model's own dtype, tokenizer)."""
    from .config import ModelArguments
    from .models import load_model_and_tokenizer

    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"llama_pro: output_dir '{out}' exists and is not an empty folder; choose a new one")
    model, tokenizer = load_model_and_tokenizer(ModelArguments(model_name_or_path=model_name_or_path),
                                                dtype=torch.float32)
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None) or torch.float32
    before = model.config.num_hidden_layers
    expand_model(model, num_expand)
    model.config.use_cache = True
    model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), torch.float32))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("expanded %d layers to %d in %s", before, model.config.num_hidden_layers, out)
    print(f"Expanded {before} layers to {model.config.num_hidden_layers} in {out}. Fine-tune it with:\n"
          f"model_name_or_path: {out}\nfinetuning_type: freeze\nfreeze_trainable_layers: {num_expand}\n"
          "use_llama_pro: true")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.llama_pro",
                                     description="LLaMA Pro block expansion (LLaMA-Factory's scripts/llama_pro.py).")
    parser.add_argument("--model_name_or_path", default="", help="model folder or hub id (empty: the default model)")
    parser.add_argument("--output_dir", required=True, help="new folder for the expanded model")
    parser.add_argument("--num_expand", type=int, required=True, help="blocks to add; must divide the layers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        block_expansion(args.model_name_or_path, args.output_dir, args.num_expand)
    except TuneforgeError as exc:
        print(f"tuneforge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
