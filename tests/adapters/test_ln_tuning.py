"""LN tuning beyond the peft oracle (test_peft_family.py: Llama's RMSNorm, Qwen2, GPT-2 and BERT's
LayerNorms): two adapters, routing, LoRA beside it, half-precision bases, config errors, refusals.
"""

from __future__ import annotations

import pytest
import torch
from test_matrix import batch, build, evaluate

import tuneforge
from tuneforge.adapters import (
    LNTuningConfig,
    LoraConfig,
    add_adapter,
    delete_adapter,
    list_adapters,
    merge_adapters,
    route_adapters,
    set_active_adapters,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError


def test_ln_tuning_two_adapters_switch_route_and_sit_beside_lora():
    """Two LN-tuning adapters switch and route per row; one layer runs one of them at a time; a
    LoRA adapter on the linear layers adds up with one; deleting gives the others back."""
    model = build("llama")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    lora_only = evaluate(model, "llama")
    for name, seed in (("a", 1), ("b", 2)):
        add_adapter(model, LNTuningConfig(), name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in adapter_layers(model, name):
                for p in m.adapter_parameters(name).values():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    outs = {}
    for name in ("a", "b"):
        set_active_adapters(model, [name])
        outs[name] = evaluate(model, "llama")
    assert (outs["a"] - outs["b"]).abs().max() > 1e-3
    set_active_adapters(model, ["a", "b"])
    with pytest.raises(ConfigError, match="LN tuning runs one adapter per layer"):
        evaluate(model, "llama")
    with pytest.raises(ConfigError, match="LN tuning merges one adapter per layer"):
        merge_adapters(model)
    unmerge_adapters(model)
    set_active_adapters(model, ["lora", "a"])
    both = evaluate(model, "llama")
    assert (both - lora_only).abs().max() > 1e-3 and (both - outs["a"]).abs().max() > 1e-3
    ids = batch("llama", 1)["input_ids"]
    with torch.no_grad(), route_adapters(model, ["b", "a"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], outs["b"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], outs["a"][1], atol=1e-5, rtol=0)
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    set_active_adapters(model, ["lora"])
    assert (evaluate(model, "llama") - lora_only).abs().max().item() <= 1e-6
    assert not any(".ln_tuning_layers." in n for n in model.state_dict())


def test_ln_tuning_half_precision_base_trains_fp32_copies():
    model = build("llama").to(torch.bfloat16)
    add_adapter(model, LNTuningConfig())
    copies = [p for n, p in model.named_parameters() if ".ln_tuning_layers." in n]
    assert copies and all(p.dtype == torch.float32 and p.requires_grad for p in copies)
    ids = batch("llama", 1)["input_ids"]
    out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in copies)


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules="all-linear"), "target_modules 'all-linear' does not apply"),
    (dict(target_modules=""), "target_modules must not be an empty string"),
    (dict(exclude_modules="("), "exclude_modules='\\(' is not a valid regex"),
])
def test_ln_tuning_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        LNTuningConfig(**kw)


def test_ln_tuning_refusals_change_nothing():
    model = build("llama")
    with pytest.raises(ConfigError, match="holding other modules; target the norm layers"):
        add_adapter(model, LNTuningConfig(target_modules=["mlp"]))
    with pytest.raises(ConfigError, match="no default target_modules for model type 'bert'"):
        add_adapter(build("bert"), LNTuningConfig())
    assert list_adapters(model) == {}
    assert tuneforge.LNTuningConfig is LNTuningConfig
