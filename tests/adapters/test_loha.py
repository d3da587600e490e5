"""LoHa beyond the peft oracle (test_peft_family.py: Llama, Qwen2, GPT-2's head, BERT, a CNN flat
and in FedPara's Tucker form, a Conv1d net): dropouts, LoRA beside it, routing, config errors,
refusals (GPT-2's Conv1D and embedding).
"""

from __future__ import annotations

import pytest
import torch
from test_matrix import batch, build, evaluate

import tuneforge
from tuneforge.adapters import (
    LoHaConfig,
    LoraConfig,
    add_adapter,
    delete_adapter,
    list_adapters,
    route_adapters,
    set_active_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError


def test_loha_dropouts_are_training_only():
    """rank_dropout / module_dropout change nothing in eval mode (peft's semantics); in training a
    module dropout near 1 skips the adapters, and a rank dropout zeroes whole output rows and
    rescales the kept ones by 1 / (fraction kept)."""
    kw = dict(r=4, target_modules=["q_proj", "down_proj"], init_weights=False)
    plain = add_adapter(build("llama"), LoHaConfig(**kw))
    dropped = add_adapter(build("llama"), LoHaConfig(**kw, rank_dropout=0.5, module_dropout=0.999999))
    dropped.load_state_dict(plain.state_dict())
    assert (evaluate(dropped, "llama") - evaluate(plain, "llama")).abs().max() == 0
    ids = batch("llama", 1)["input_ids"]
    torch.manual_seed(0)
    dropped.train()
    with torch.no_grad():
        skipped = dropped(input_ids=ids).logits
    torch.testing.assert_close(skipped, evaluate(build("llama"), "llama"), atol=1e-6, rtol=0)
    layer = dict(adapter_layers(plain))["model.layers.0.self_attn.q_proj"]
    layer.lyco_rank_dropout["default"] = 0.5
    full = layer.delta_weight("default").detach()
    torch.manual_seed(1)
    rows = layer.delta_weight("default", rank_dropout=True).detach()
    kept = rows.abs().sum(1) > 0
    assert 0 < kept.sum() < rows.shape[0]
    torch.testing.assert_close(rows[kept], full[kept] * rows.shape[0] / kept.sum(), rtol=1e-5, atol=1e-7)


def test_loha_beside_lora_route_and_delete():
    """LoHa and LoRA on one model (not on one layer): both active add up, per-sample routing picks one
    per row, deleting the LoHa adapter gives the LoRA model back."""
    model = build("llama")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    lora_only = evaluate(model, "llama")
    add_adapter(model, LoHaConfig(r=2, target_modules=["down_proj"], init_weights=False), "loha")
    loha_only = evaluate(model, "llama")
    set_active_adapters(model, ["lora", "loha"])
    both = evaluate(model, "llama")
    assert (both - lora_only).abs().max() > 1e-3 and (both - loha_only).abs().max() > 1e-3
    ids = batch("llama", 1)["input_ids"]
    with torch.no_grad(), route_adapters(model, ["loha", "lora"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], loha_only[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], lora_only[1], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="already carries a lora adapter"):
        add_adapter(model, LoHaConfig(target_modules=["q_proj"]), "x")
    delete_adapter(model, "loha")
    set_active_adapters(model, ["lora"])
    assert (evaluate(model, "llama") - lora_only).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be a positive integer \\(the LoHa rank\\), got 0"),
    (dict(alpha=-1), "alpha must be a positive number, got -1"),
    (dict(rank_dropout=1.0), "rank_dropout must be a number in \\[0, 1\\), got 1.0"),
    (dict(init_weights="yes"), "init_weights must be true or false, got 'yes'"),
    (dict(layers_pattern="layers"), "layers_pattern is set but layers_to_transform is not"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform cannot be used"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern\\['q_proj'\\] must be a positive integer"),
])  # fmt: skip
def test_loha_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoHaConfig(**kw)


def test_loha_refusals_change_nothing():
    model = build("gpt2")
    with pytest.raises(ConfigError, match="c_attn is a Conv1D, which LoHa does not support yet"):
        add_adapter(model, LoHaConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="wte is a Embedding, which LoHa does not support yet"):
        add_adapter(model, LoHaConfig(target_modules=["wte"]))
    with pytest.raises(ConfigError, match="target_modules is not set"):
        add_adapter(model, LoHaConfig())
    assert list_adapters(model) == {}
    assert tuneforge.LoHaConfig is LoHaConfig
