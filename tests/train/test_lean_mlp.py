"""Lean gated MLPs (train/lean_mlp.py): bit-equal loss and gradients, the product not kept, and
the probe keeps any MLP that computes something else."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.adapters.adapter_testkit import make_model
from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.train.lean_mlp import SwiGLU, install_lean_mlp, uninstall_lean_mlp


def _lora_model(kind="llama", dropout=0.0, full=False, **overrides):
    model = make_model(kind, seed=1, **overrides)
    if not full:
        for p in model.parameters():
            p.requires_grad_(False)
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout))
        with torch.no_grad():  # a non-zero B, so that every LoRA gradient is non-trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, dropout, full", [("llama", 0.0, False), ("qwen2", 0.1, False), ("llama", 0.0, True)])
def test_loss_and_gradients_bit_equal(kind, dropout, full):
    model = _lora_model(kind, dropout, full)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    assert install_lean_mlp(model) == 2
    lean_loss, lean_grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name
    uninstall_lean_mlp(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def _product_kept(model) -> bool:
    """Whether autograd keeps the down projection's input (the product) after the forward."""
    seen = []
    mlp = model.model.layers[0].mlp
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    handle.remove()
    gc.collect()
    kept = seen[0]() is not None
    loss.backward()
    return kept


def test_product_is_not_kept_for_backward():
    model = _lora_model()
    assert _product_kept(model)  # the plain forward keeps it (LoRA A's input)
    install_lean_mlp(model)
    assert not _product_kept(model)


def test_swiglu_function_gradients_equal_autograd():
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(SwiGLU.apply, (g, u))


def test_probe_keeps_other_mlps():
    # another activation (gelu): the module's forward stays
    gelu = _lora_model(hidden_act="gelu")
    assert install_lean_mlp(gelu) == 0
    assert all("forward" not in m.__dict__ for m in gelu.modules())
    # an MLP with its own scale after the down projection
    scaled = _lora_model()
    for layer in scaled.model.layers:
        plain = type(layer.mlp).forward
        layer.mlp.forward = (lambda self_plain: (lambda x: 2 * self_plain(x)))(plain.__get__(layer.mlp))
    assert install_lean_mlp(scaled) == 0
