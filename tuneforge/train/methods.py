"""Fine-tuning types (lora / freeze / full): which parameters train, and how the result is
saved. The training loop only sees `requires_grad` and calls `save_final(model, dir)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import adapters
from ..errors import ConfigError
from ..models import attach_adapters, split_paths

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class TrainableSetup:
    kind: str
    save_final: Callable  # (model, directory) -> None: the artefact users load afterwards
    save_in_checkpoint: Callable | None  # extra user-facing files inside each checkpoint


def lora_config(finetune) -> adapters.LoraConfig:
    target = finetune.lora_target.strip()
    targets = "all-linear" if target in ("all", "all-linear") else split_paths(target)
    return adapters.LoraConfig(
        r=finetune.lora_rank,
        lora_alpha=finetune.lora_alpha if finetune.lora_alpha is not None else 2 * finetune.lora_rank,
        lora_dropout=finetune.lora_dropout,
        target_modules=targets,
        modules_to_save=split_paths(finetune.additional_target) or None,
        use_rslora=finetune.use_rslora,
    )


def _decoder_layers(model) -> torch.nn.ModuleList:
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError("finetuning_type: freeze could not find the model's decoder layers; "
                      "use finetuning_type: lora or full")


def _freeze(model, finetune) -> None:
    layers = _decoder_layers(model)
    n = finetune.freeze_trainable_layers
    if n == 0 or abs(n) > len(layers):
        raise ConfigError(f"config key 'freeze_trainable_layers' must be between 1 and "
                          f"{len(layers)} (or -1 and -{len(layers)}) for this model; got {n}")
    chosen = list(layers)[-n:] if n > 0 else list(layers)[:-n]
    modules = split_paths(finetune.freeze_trainable_modules)
    model.requires_grad_(False)
    matched = False
    for layer in chosen:
        for name, param in layer.named_parameters():
            if modules == ["all"] or any(f".{m}." in f".{name}" or name.startswith(m + ".")
                                         for m in modules):
                param.requires_grad_(True)
                matched = True
    if not matched:
        raise ConfigError(f"config key 'freeze_trainable_modules' ({finetune.freeze_trainable_modules})"
                          " matches no parameter in the trainable layers")


def prepare_model(model, tokenizer, cfg) -> tuple[torch.nn.Module, TrainableSetup]:
    finetune, model_args = cfg.finetune, cfg.model
    base_id = model_args.model_name_or_path or DEFAULT_HUB_ID

    def save_model_dir(m, directory):
        m.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    if finetune.finetuning_type == "lora":
        paths = split_paths(model_args.adapter_name_or_path)
        if paths:
            model = attach_adapters(model, paths, trainable=True)
        else:
            adapters.add_adapter(model, lora_config(finetune), name="default")
        for p in model.parameters():  # adapters train in fp32 even on a bf16 base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

        def save_adapter_dir(m, directory):
            adapters.save_adapter(m, directory, name="default", base_model_name_or_path=base_id)
            tokenizer.save_pretrained(directory)

        return model, TrainableSetup("lora", save_adapter_dir, save_adapter_dir)

    if model_args.adapter_name_or_path:
        raise ConfigError("config key 'adapter_name_or_path' needs finetuning_type: lora "
                          "(export a merged model first to train it in full or freeze mode)")
    if finetune.finetuning_type == "freeze":
        _freeze(model, finetune)
    else:
        model.requires_grad_(True)
    model.float()  # full/freeze keep fp32 master weights; autocast gives bf16 compute on GPUs
    return model, TrainableSetup(finetune.finetuning_type, save_model_dir, None)


def describe(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
