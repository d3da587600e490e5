"""What the training loop asks of the adapters it trains, whatever their method: the methods'
`check_run`, `before_step`, `batch_context`, `training_loss`, `forward_loss`, `after_step`, `after_training` and
`training_state` / `load_training_state` hooks (methods.py), run for every adapter on the model
that has a trainable parameter. A model without adapters, or whose methods give none of the hooks,
costs a scan of its adapter layers per micro-batch and nothing else."""

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


def gives(model: nn.Module, hook: str) -> bool:
    """Whether some trained adapter on `model` has a method that gives `hook` (e.g. "forward_loss")."""
    return bool(_trained(model, hook))


def training_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the trained adapters' `training_loss` terms (0-dim, with autograd), or None."""
    terms = [t for owner, name, cfg, m in _trained(model, "training_loss")
             if (t := m.training_loss(owner, name, cfg)) is not None]  # fmt: skip
    return torch.stack(terms).sum() if terms else None


def forward_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the trained adapters' `forward_loss` terms for the forwards since the last call
    (0-dim, with autograd), or None; called after each micro-batch's forward."""
    terms = [t for owner, name, cfg, m in _trained(model, "forward_loss")
             if (t := m.forward_loss(owner, name, cfg)) is not None]  # fmt: skip
    return torch.stack(terms).sum() if terms else None


def after_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Run every trained adapter's `after_step(model, name, config, step, total_steps)`."""
    for owner, name, cfg, m in _trained(model, "after_step"):
        m.after_step(owner, name, cfg, step, total_steps)


_SEP = "::"  # adapter name :: the method's own key, in a checkpoint's adapter_training_state file


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained adapter's `training_state`, keyed '<adapter name>::<its key>' ({} when none)."""
    return {f"{name}{_SEP}{key}": tensor.detach().contiguous()
            for owner, name, cfg, m in _trained(model, "training_state")
            for key, tensor in m.training_state(owner, name, cfg).items()}


def load_training_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give each trained adapter whose method has `load_training_state` its part of `tensors` (as
    `training_state` wrote them)."""
    for owner, name, cfg, m in _trained(model, "load_training_state"):
        prefix = name + _SEP
        m.load_training_state(owner, name, cfg, {k[len(prefix):]: v for k, v in tensors.items()
                                                 if k.startswith(prefix)})
def check_run(model: nn.Module, total_steps: int) -> None:
    """Run every trained adapter's `check_run(model, name, config, total_steps)` (ConfigError)."""
    for owner, name, cfg, m in _trained(model, "check_run"):
        m.check_run(owner, name, cfg, total_steps)


def before_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Run every trained adapter's `before_step(model, name, config, step, total_steps)`."""
    for owner, name, cfg, m in _trained(model, "before_step"):
        m.before_step(owner, name, cfg, step, total_steps)


def after_training(model: nn.Module, evaluate, report) -> dict:
    """The results entries of every trained adapter's `after_training(model, name, config, evaluate,
    report)`, merged ({} when no method gives the hook)."""
    out: dict = {}
    for owner, name, cfg, m in _trained(model, "after_training"):
        out.update(m.after_training(owner, name, cfg, evaluate, report) or {})
    return out
def batch_context(model: nn.Module, batch: dict) -> ExitStack:
    """A context manager that enters every trained adapter's `batch_context(model, name, config,
    batch)` (the batch's side information, e.g. multi-task LoRA's per-token task ids, set on its
    layers) and leaves them in reverse order; an empty one when no method gives the hook."""
    stack = ExitStack()
    for owner, name, cfg, m in _trained(model, "batch_context"):
        stack.enter_context(m.batch_context(owner, name, cfg, batch))
    return stack
