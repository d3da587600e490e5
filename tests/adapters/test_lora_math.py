"""Same weights -> same outputs and gradients as peft; inits and scalings as peft."""

import copy
import math

import pytest
import torch
from adapter_testkit import copy_ours_to_peft, logits, make_model, peft_lora_modules, tokens
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from tuneforge.adapters import LoraConfig, add_adapter, trainable_parameters
from tuneforge.adapters.core import lora_layers

TOL = 1e-5


def _pair(kind, **kw):
    """(ours, peft) with identical base and adapter weights (random B, so the adapter is not a no-op)."""
    ours = add_adapter(make_model(kind), LoraConfig(init_lora_weights=False, **kw))
    theirs = get_peft_model(make_model(kind), PeftLoraConfig(init_lora_weights=False, **kw))
    copy_ours_to_peft(ours, theirs)
    return ours, theirs


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
        ("qwen2", dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"], use_rslora=True)),
        ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"])),
    ],
)
def test_forward_and_gradients_equal_peft(kind, kw):
    ours, theirs = _pair(kind, **kw)
    ids = tokens()
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    g_ours, g_theirs = _grads(ours), _grads(theirs)
    assert len(g_ours) == len(g_theirs) > 0
    for path, _ in lora_layers(ours):
        for ab in ("A", "B"):
            mine = g_ours[f"{path}.lora_{ab}.default"]
            ref = g_theirs[f"base_model.model.{path}.lora_{ab}.default.weight"]
            assert (mine - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())
    ours.eval(), theirs.eval()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= TOL


def test_scaling_and_rslora_equal_peft():
    kw = dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    for rs in (False, True):
        ours, theirs = _pair("llama", use_rslora=rs, **kw)
        ref = peft_lora_modules(theirs)
        for path, layer in lora_layers(ours):
            assert layer.lora_scaling["default"] == pytest.approx(ref[path].scaling["default"], rel=1e-12)
            r = layer.lora_r["default"]
            assert layer.lora_scaling["default"] == pytest.approx(8 / math.sqrt(r) if rs else 8 / r)


def test_init_follows_peft():
    r = 8
    model = add_adapter(make_model("llama"), LoraConfig(r=r, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert A.abs().max() <= bound and A.std() > bound / 3
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(make_model("llama"), ids))  # starts as a no-op

    model = add_adapter(make_model("llama"), LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights="gaussian"))
    A = model.model.layers[0].self_attn.q_proj.lora_A["default"]
    assert A.std().item() == pytest.approx(1 / r, rel=0.15)
    model = add_adapter(make_model("llama"), LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False))
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.lora_B["default"]) > 0


def test_dropout_only_in_training():
    model = add_adapter(
        make_model("llama"), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False)
    )
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.equal(a, b)


def test_gradient_checkpointing_generate_to_deepcopy():
    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = tokens()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = _grads(model)
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()
    ckpt = _grads(model)
    assert plain.keys() == ckpt.keys()
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
    model.activation_checkpointing_disable()
    model.eval()

    out = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)

    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, ids), logits(model, ids))
    expected = logits(model, ids).double()
    model.to(torch.float64)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].dtype == torch.float64
    assert (logits(model, ids) - expected).abs().max().item() <= 1e-5


def test_trainable_counts():
    model = make_model("llama")
    total = sum(p.numel() for p in model.parameters())
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, all_ = trainable_parameters(model)
    assert trainable == 2 * 4 * (64 + 64) and all_ == total + trainable


def test_torch_save_and_accelerate_hooks(tmp_path):
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = tokens()
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(logits(again, ids), logits(model, ids))

    hooked = make_model("llama")  # accelerate keeps the bound forward in `_old_forward`
    for m in hooked.modules():
        if isinstance(m, torch.nn.Linear):
            add_hook_to_module(m, ModelHook())
    add_adapter(hooked, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert torch.equal(logits(hooked, ids), logits(model, ids))


def test_linear_subclass_keeps_its_forward():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    from tuneforge.adapters import unload

    net = torch.nn.Sequential(Scaled(8, 8))
    x = torch.randn(2, 8)
    base = net(x)
    add_adapter(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = net[0]
    assert isinstance(layer, Scaled) and type(layer).__name__ == "LoraScaled"
    with torch.no_grad():
        delta = layer.lora_scaling["default"] * x @ layer.lora_A["default"].T @ layer.lora_B["default"].T
    assert torch.allclose(net(x), base + delta, atol=1e-6)
    unload(net, merge=False)
    assert type(net[0]) is Scaled and torch.equal(net(x), base)
