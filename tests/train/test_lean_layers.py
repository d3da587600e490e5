"""Lean layers (train/lean_mlp.py, train/lean_layers.py): bit-equal loss and gradients, the
rebuildable tensors not kept, and the probe keeps any MLP that computes something else."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from tests.adapters.adapter_testkit import make_model
from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.train.lean_mlp import SwiGLU, install_lean_mlp, uninstall_lean_mlp
from tuneforge.train.lean_layers import install_lean_layers, uninstall_lean_layers


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


def _kept(model, register) -> bool:
    """Whether autograd keeps, after the forward, the tensor that `register(seen)` hooks capture
    (a weak reference appended to `seen`; the hook's handle is returned)."""
    seen = []
    handle = register(seen)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    handle.remove()
    gc.collect()
    kept = seen[0]() is not None
    loss.backward()
    return kept


def _product_kept(model) -> bool:
    """The down projection's input (the product)."""
    return _kept(model, lambda seen: model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(weakref.ref(args[0]))))


def _norm_output_kept(model) -> bool:
    return _kept(model, lambda seen: model.model.layers[0].input_layernorm.register_forward_hook(
        lambda m, args, out: seen.append(weakref.ref(out))))


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


@pytest.mark.parametrize("kind, full", [("llama", False), ("qwen2", False), ("llama", True)])
def test_lean_norms_bit_equal_and_not_kept(kind, full):
    model = _lora_model(kind, 0.0, full)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    assert _norm_output_kept(model)
    assert install_lean_layers(model) == 2 and install_lean_mlp(model) == 2
    lean_loss, lean_grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, lean_loss) and grads.keys() == lean_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name
    assert not _norm_output_kept(model)
    uninstall_lean_layers(model)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert _norm_output_kept(model)



def test_packed_attention_output_rebuilt_bit_equal(monkeypatch):
    """On a packed row (segment attention) o_proj's input is rebuilt from the segments' outputs."""
    from tuneforge.data import PackingCollator
    from tuneforge.train import packed_attention as pa

    model = _lora_model()
    pa.use_packed_attention(model)
    g = torch.Generator().manual_seed(5)
    rows = [{"input_ids": (ids := torch.randint(1, 256, (n,), generator=g).tolist()), "labels": ids}
            for n in (7, 5, 9)]
    batch = PackingCollator()(rows)
    seen, original = [], pa.segment_attention
    monkeypatch.setattr(pa, "segment_attention", lambda *a, **k: (out := original(*a, **k), seen.append(
        weakref.ref(out)))[0])

    def run():
        model.zero_grad(set_to_none=True)
        seen.clear()
        loss = model(**batch).loss
        gc.collect()
        kept = seen[0]() is not None  # the first layer's attention output (what o_proj reads)
        loss.backward()
        return kept, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept, loss, grads = run()
    assert kept and len(seen) == 2
    install_lean_layers(model)
    lean_kept, lean_loss, lean_grads = run()
    assert not lean_kept and torch.equal(loss, lean_loss)
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name


def test_bit_equal_under_bf16_autocast_with_backward_outside_it():
    """Mixed precision: the recipes rebuild under the forward's autocast state, whatever state the
    backward runs in (here: none)."""
    model = _lora_model()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()
    install_lean_layers(model), install_lean_mlp(model)
    lean_loss, lean_grads = run()
    assert torch.equal(loss, lean_loss) and grads.keys() == lean_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name
