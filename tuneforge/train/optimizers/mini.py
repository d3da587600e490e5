"""Adam-mini (adam-mini) and Muon (torch.optim.Muon), built as LLaMA-Factory builds them.

Adam-mini partitions the model by its own parameter names (heads of q/k, neurons, embeddings)
from the model's hidden size and head counts. Muon: torch's Muon (with Moonlight's learning-rate
matching, `adjust_lr_fn="match_rms_adamw"`, as LLaMA-Factory's copy of it) for the trainable 2-D
weights but embeddings and the output head, AdamW for those and every other parameter, with the
same learning rate and weight decay; the two run as one optimizer (`Combined`), so the schedule,
clipping and checkpoints see one."""

from __future__ import annotations

import logging
import torch

from ...errors import ConfigError
from .combined import Combined
from .keys import STATE_LAYOUT

log = logging.getLogger("tuneforge")


def build_muon(model, args) -> torch.optim.Optimizer:
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"config key 'use_muon' needs torch.optim.Muon, which torch {torch.__version__} "
                          "does not have: pip install 'torch>=2.9', or drop use_muon")
    muon, adamw = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            hidden = param.ndim == 2 and "embed" not in name and "lm_head" not in name
            (muon if hidden else adamw).append(param)
    parts = []
    if muon:
        parts.append(torch.optim.Muon(muon, lr=args.learning_rate, weight_decay=args.weight_decay,
                                      momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"))
    if adamw:
        parts.append(torch.optim.AdamW(adamw, lr=args.learning_rate, weight_decay=args.weight_decay,
                                       betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon))
    log.info("Muon for %d weights, AdamW for %d other parameters", len(muon), len(adamw))
    return Combined(parts)


def build_adam_mini(model, args) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    class AdamMini(Adam_mini):
        # its second moments are per block (head, neuron): not shaped like the parameters
        states_shaped_like_params = False

        def state_dict(self):
            return {**super().state_dict(), STATE_LAYOUT: "Adam_mini"}

    config = getattr(model, "config", None)
    optimizer = AdamMini(
        named_parameters=model.named_parameters(), lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
        model_sharding=False, dim=getattr(config, "hidden_size", None) or 2048,
        n_heads=getattr(config, "num_attention_heads", None) or 32,
        n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)
    log.info("Adam-mini over %d parameter blocks", len(optimizer.param_groups))
    return optimizer
