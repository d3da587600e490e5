"""merge / unmerge / unload / disable: explicit, reversible, and never a side effect."""

import pytest
import torch
from adapter_testkit import logits, make_model, tokens, train_steps

from tuneforge.adapters import (
    LoraConfig,
    LoraLayer,
    add_adapter,
    disable_adapters,
    merge_adapters,
    unload,
    unmerge_adapters,
)
from tuneforge.errors import ModelError

TOL = 1e-5


def _trained(kind="llama", **kw):
    kw.setdefault("target_modules", "all-linear")
    model = add_adapter(make_model(kind), LoraConfig(r=4, init_lora_weights=False, **kw))
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(kind):
    model = _trained(kind)
    ids = tokens()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = logits(model, ids)
    assert merge_adapters(model) == ["default"]
    assert (logits(model, ids) - adapted).abs().max().item() <= TOL
    with pytest.warns(UserWarning, match="already merged"):
        assert merge_adapters(model) == []  # no double merge
    assert (logits(model, ids) - adapted).abs().max().item() <= TOL
    assert unmerge_adapters(model) == ["default"]
    after = model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= TOL
    assert (logits(model, ids) - adapted).abs().max().item() <= TOL


def test_train_eval_never_merge():
    model = _trained()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train(), model.eval(), model.train(False)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    merge_adapters(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def test_safe_merge_refuses_nan_and_changes_nothing():
    model = _trained()
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="NaN"):
        merge_adapters(model, safe_merge=True)
    assert all(torch.equal(weights[k], v) or k.endswith("lora_B.default") for k, v in model.state_dict().items())
    assert not any(m.lora_merged for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_unload_merge_gives_plain_model_with_adapted_outputs(kind):
    base = make_model(kind)
    base_keys = list(base.state_dict())
    base_types = {n: type(m) for n, m in base.named_modules()}
    model = _trained(kind)
    ids = tokens()
    adapted = logits(model, ids)
    plain = unload(model, merge=True)
    assert plain is model
    assert list(plain.state_dict()) == base_keys
    assert {n: type(m) for n, m in plain.named_modules()} == base_types
    assert not hasattr(plain, "_tuneforge_adapters")
    assert (logits(plain, ids) - adapted).abs().max().item() <= TOL


def test_unload_without_merge_restores_base():
    model = _trained()
    ids = tokens()
    merge_adapters(model)  # even when merged, merge=False gives the base back
    plain = unload(model, merge=False)
    assert (logits(plain, ids) - logits(make_model("llama"), ids)).abs().max().item() <= TOL


def test_unload_merges_modules_to_save():
    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    train_steps(model, steps=2)
    ids = tokens()
    adapted = logits(model, ids)
    plain = unload(model)
    assert list(plain.state_dict()) == list(make_model("llama").state_dict())
    assert (logits(plain, ids) - adapted).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_disable_gives_base_outputs_exactly(kind):
    cfg = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"], init_lora_weights=False)
    model = add_adapter(make_model(kind), cfg)
    train_steps(model, steps=1)
    ids = tokens()
    base = logits(make_model(kind), ids)
    adapted = logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), adapted)
    merge_adapters(model)  # disabling a merged model unmerges for the block and merges back
    with disable_adapters(model):
        assert (logits(model, ids) - base).abs().max().item() <= TOL
    assert (logits(model, ids) - adapted).abs().max().item() <= TOL


def test_disable_keeps_graph_for_reference_logprobs():
    """DPO-style: reference pass under disable, policy pass with the adapter, one model in memory."""
    model = _trained()
    ids = tokens()
    model.train()
    with disable_adapters(model), torch.no_grad():
        ref = model(input_ids=ids).logits
    policy = model(input_ids=ids).logits
    (policy - ref).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
