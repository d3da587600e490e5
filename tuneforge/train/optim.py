"""The optimizer: AdamW (or the `optim` transformers names) over the trainable parameters, in
weight-decay groups and, with LoRA+, learning-rate groups.

`optim` other than adamw_torch is built by transformers' own factory
(`Trainer.get_optimizer_cls_and_kwargs`), so sgd, adafactor, the bitsandbytes 8-bit and paged
optimizers, ... get exactly the class and settings (`optim_args`) that LLaMA-Factory's runs get.
The optimizers that need the Trainer's own training step or model hooks (LOMO, schedule-free, and
the `optim` names galore_* / apollo_*) are refused in one line; LLaMA-Factory's own keys for
GaLore, APOLLO, BAdam, Adam-mini and Muon (use_galore, ...) build those optimizers from their
packages (train/optimizers/), on the `optim` optimizer's settings.

Weight decay as transformers' Trainer: none on 1-D parameters (biases, norm weights).
LoRA+ (`loraplus_lr_ratio`, LLaMA-Factory's grouping): every LoRA B matrix and every 1-D trainable
parameter (biases, DoRA magnitudes) learns at `learning_rate * loraplus_lr_ratio`; the B matrix of
an embedding LoRA learns at `loraplus_lr_embedding`; everything else (LoRA A, modules_to_save
weights) at `learning_rate`. The first group always runs at `learning_rate`, so the logged learning
rate is the base one.

On resume (`restore_state`) the optimizer takes a checkpoint's state (Adam's moments and step
counts) but keeps the hyper-parameters this run's config gives its groups.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..adapters import LoraLayer
from ..errors import CheckpointError, ConfigError


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


# optimizers whose transformers integration lives in its Trainer (layer-wise hooks, its own step,
# train/eval mode switches): the factory alone would build something else
_TRAINER_ONLY = ("galore", "apollo", "lomo", "adalomo", "schedule_free")


def build_optimizer(model, args, finetune=None) -> torch.optim.Optimizer:
    """The `optim` optimizer (default AdamW) over `param_groups`; `args` are the training arguments,
    `finetune` the fine-tuning ones. Raises ConfigError for an optim name transformers does not
    know, one that needs its Trainer, or one whose package is missing."""
    from .optimizers.build import build

    name = getattr(args, "optim", "adamw_torch") or "adamw_torch"
    if name == "adamw_torch" and not getattr(args, "optim_args", None):
        base = torch.optim.AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                                   "eps": args.adam_epsilon}
    else:
        base = _transformers_optimizer(name, args)
    special = build(model, args, finetune, base)  # use_galore, use_badam, ...
    if special is not None:
        return special
    cls, kwargs = base
    return cls(param_groups(model, args, finetune), **kwargs)


def _transformers_optimizer(name: str, args) -> tuple[type, dict]:
    from transformers import Trainer
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if name not in known:
        raise ConfigError(f"config key 'optim' must be one of transformers' optimizer names ({', '.join(known)}); "
                          f"got '{name}'")
    if name.startswith(_TRAINER_ONLY):
        own = next((f"; for {label} set use_{key}: true (LLaMA-Factory's key) with optim: adamw_torch"
                    for key, label in (("galore", "GaLore"), ("apollo", "APOLLO")) if name.startswith(key)), "")
        raise ConfigError(f"optim: {name} runs inside transformers' Trainer (its own hooks or step), which "
                          "tuneforge's loop does not use; choose adamw_torch, sgd, adafactor or a bitsandbytes "
                          f"optimizer{own}")
    # the attributes the factory reads of a TrainingArguments (building a real one would reset
    # accelerate's process state under the running Accelerator)
    hf_args = SimpleNamespace(optim=OptimizerNames(name), optim_args=getattr(args, "optim_args", None),
                              learning_rate=args.learning_rate, adam_beta1=args.adam_beta1,
                              adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
                              weight_decay=args.weight_decay, warmup_steps=getattr(args, "warmup_steps", 0))
    try:
        return Trainer.get_optimizer_cls_and_kwargs(hf_args)
    except (ImportError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"optim: {name} cannot be built here ({first}); install what it names or choose "
                          "another optimizer") from None


def hyper_parameters(groups: list[dict]) -> list[dict]:
    """Each parameter group's settings (lr, initial_lr, weight_decay, betas, eps, ...), without
    its parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in groups]


def _misfit(optimizer, saved: dict) -> str | None:
    """How a saved optimizer state does not fit this optimizer's parameters, or None. torch's
    load_state_dict compares the groups' sizes but not the tensors' shapes, which otherwise
    fail only inside the first step."""
    inner = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    if callable(getattr(inner, "misfit", None)):  # an optimizer with its own state layout (BAdam)
        return inner.misfit(saved)
    # low-rank (GaLore, APOLLO) and per-block (Adam-mini) moments are not shaped like the weights
    shaped = getattr(inner, "states_shaped_like_params", True)
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups")
    states = saved.get("state")
    if not isinstance(saved_groups, list) or not isinstance(states, dict):
        return "it is not an optimizer state"
    if len(saved_groups) != len(groups):
        return f"{len(saved_groups)} parameter group(s) there, {len(groups)} here"
    for i, (group, then) in enumerate(zip(groups, saved_groups)):
        indices = then.get("params") if isinstance(then, dict) else None
        if not isinstance(indices, list) or len(indices) != len(group["params"]):
            count = len(indices) if isinstance(indices, list) else "no"
            return f"parameter group {i} has {count} parameter(s) there, {len(group['params'])} here"
        for index, param in zip(indices, group["params"]):
            entry = states.get(index, {})
            for key, value in (entry.items() if isinstance(entry, dict) else ()):
                if shaped and isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                    return (f"its '{key}' for a parameter of group {i} has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")
    return None


def restore_state(optimizer, saved: dict, where: Path) -> list[dict]:
    """Load a checkpoint's optimizer state (file `where`) into `optimizer`, keeping the
    hyper-parameters its groups have now (this run's config). Returns the saved groups'
    hyper-parameters.

    Raises CheckpointError (naming the file) when the state does not fit the parameters: other
    groups (loraplus_lr_ratio), other counts or shapes (another fine-tuning setup)."""
    problem = _misfit(optimizer, saved) if isinstance(saved, dict) else "it is not an optimizer state"
    if problem is None:
        current = hyper_parameters(optimizer.param_groups)
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            for group, settings in zip(optimizer.param_groups, current):
                group.update(settings)
            return hyper_parameters(saved["param_groups"])
    raise CheckpointError(f"checkpoint '{where}' does not fit this run's optimizer ({problem}): "
                          "it was made with another fine-tuning setup (finetuning_type, lora_rank, "
                          "lora_target, loraplus_lr_ratio, ...): use that setup to resume, or start "
                          "over with overwrite_output_dir: true")
