"""The optimizer: AdamW over the trainable parameters, in weight-decay groups and, with LoRA+,
learning-rate groups.

Weight decay as transformers' Trainer: none on 1-D parameters (biases, norm weights).
LoRA+ (`loraplus_lr_ratio`, LLaMA-Factory's grouping): every LoRA B matrix and every 1-D trainable
parameter (biases, DoRA magnitudes) learns at `learning_rate * loraplus_lr_ratio`; the B matrix of
an embedding LoRA learns at `loraplus_lr_embedding`; everything else (LoRA A, modules_to_save
weights) at `learning_rate`. The first group always runs at `learning_rate`, so the logged learning
rate is the base one.
"""

from __future__ import annotations

import torch

from ..adapters import LoraLayer


def _lora_b_tensors(model) -> tuple[set[int], set[int]]:
    """ids of the B matrices of LoRA layers: (linear-like layers, embedding layers).

    The layer names its tensors by peft's file suffixes, so an embedding LoRA is recognised by its
    `lora_embedding_B`, whatever the layer class stores it as.
    """
    linear, embedding = set(), set()
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.adapter_names():
            for suffix, tensor in module.peft_tensors(name).items():
                if suffix.startswith("lora_embedding_B"):
                    embedding.add(id(tensor))
                elif suffix.startswith("lora_B"):
                    linear.add(id(tensor))
    return linear, embedding


def param_groups(model, args, finetune=None) -> list[dict]:
    """AdamW parameter groups (empty ones left out); `finetune` brings the LoRA+ keys."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    ratio = getattr(finetune, "loraplus_lr_ratio", None)
    if ratio is None:
        groups = [{"params": decay, "weight_decay": args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]
    lr = args.learning_rate
    b_ids, embedding_b_ids = _lora_b_tensors(model)
    groups = [
        {"params": [p for p in decay if id(p) not in b_ids and id(p) not in embedding_b_ids],
         "lr": lr, "weight_decay": args.weight_decay},
        {"params": [p for p in decay if id(p) in b_ids], "lr": lr * ratio, "weight_decay": args.weight_decay},
        {"params": no_decay, "lr": lr * ratio, "weight_decay": 0.0},
        {"params": [p for p in decay if id(p) in embedding_b_ids], "lr": finetune.loraplus_lr_embedding,
         "weight_decay": args.weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model, args, finetune=None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; `args` are the training arguments, `finetune` the fine-tuning ones."""
    return torch.optim.AdamW(param_groups(model, args, finetune), lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
