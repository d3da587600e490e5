"""What the training loop asks of the adapters it trains, whatever their method: the methods'
`training_loss`, `after_step` and `batch_context` hooks (methods.py), run for every adapter on the
model that has a trainable parameter. A model without adapters, or whose methods give neither hook, costs a scan
of its adapter layers per step and nothing else."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from .core import adapter_layers, get_state, method_of


def _trained(model: nn.Module, hook: str) -> list[tuple[nn.Module, str, object, object]]:
    """(the module holding the adapters, adapter name, config, method) for each trained adapter whose
    method gives `hook`; `model` may wrap the adapted model (a reward model's value head)."""
    owner = next((m for m in model.modules() if get_state(m) is not None), None)  # a wrapper's inner model
    if owner is None:
        return []
    model, st = owner, get_state(owner)
    out = []
    for name, cfg in st.configs.items():
        method = method_of(model, name)
        if getattr(method, hook) is None:
            continue
        if any(p.requires_grad for _, m in adapter_layers(model, name) for p in m.adapter_parameters(name).values()):
            out.append((model, name, cfg, method))
    return out


def training_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the trained adapters' `training_loss` terms (0-dim, with autograd), or None."""
    terms = [t for owner, name, cfg, m in _trained(model, "training_loss")
             if (t := m.training_loss(owner, name, cfg)) is not None]  # fmt: skip
    return torch.stack(terms).sum() if terms else None


def after_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Run every trained adapter's `after_step(model, name, config, step, total_steps)`."""
    for owner, name, cfg, m in _trained(model, "after_step"):
        m.after_step(owner, name, cfg, step, total_steps)


def batch_context(model: nn.Module, batch: dict) -> ExitStack:
    """A context manager that enters every trained adapter's `batch_context(model, name, config,
    batch)` (the batch's side information, e.g. multi-task LoRA's per-token task ids, set on its
    layers) and leaves them in reverse order; an empty one when no method gives the hook."""
    stack = ExitStack()
    for owner, name, cfg, m in _trained(model, "batch_context"):
        stack.enter_context(m.batch_context(owner, name, cfg, batch))
    return stack
