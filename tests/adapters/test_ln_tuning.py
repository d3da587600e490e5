"""LN tuning through the method seams, checked against peft's LNTuningConfig four ways on tiny
Llama (RMSNorm), Qwen2, GPT-2 and BERT (LayerNorm with biases; classifier in modules_to_save):
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout);
2. tuneforge trains and saves -> peft loads -> same outputs;
3. peft trains and saves -> tuneforge loads -> same outputs;
4. merge (the copy's parameters replace the norm's) == unmerged, unmerge restores, disable == base.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LNTuningConfig as PeftLNTuningConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from test_matrix import assert_peft_file_loads, assert_same_as_peft, batch, build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    LNTuningConfig,
    LoraConfig,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge_adapters,
    route_adapters,
    save_adapter,
    set_active_adapters,
    unload,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError

TOL = 1e-5
# peft's defaults for Llama / Qwen2 / GPT-2; BERT has none, so its LayerNorms are named
KINDS = {"llama": {}, "qwen2": {}, "gpt2": {}, "bert": dict(target_modules=["LayerNorm"], modules_to_save=["classifier"])}


def pair(kind: str, kw: dict):
    """(ours, peft) with identical base weights and identical (moved) norm copies."""
    ours = add_adapter(build(kind), LNTuningConfig(**kw))
    theirs = get_peft_model(build(kind), PeftLNTuningConfig(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("kind", list(KINDS))
def test_ln_tuning_matches_peft(tmp_path, kind):
    kw = KINDS[kind]

    # 1. same weights: same outputs and gradients
    ours, theirs = pair(kind, kw)
    assert {n for n, _ in adapter_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "ln_tuning_layers")
    }
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours, theirs, kind, base)
    assert all(g.abs().max() > 0 for k, g in g_ours.items() if ".ln_tuning_layers." in k)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".ln_tuning_layers." in n or "classifier" in n for n in trainable)

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), LNTuningConfig(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LN_TUNING"
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(build(kind), PeftLNTuningConfig(**kw))
    assert_peft_file_loads(theirs, kind, LNTuningConfig, tmp_path)

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "ln_tuning" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=0, rtol=0, msg=k)
    with disable_adapters(ours):
        assert (evaluate(ours, kind) - base).abs().max().item() <= 1e-6
    merged = evaluate(unload(ours, merge=True), kind)
    assert (merged - trained).abs().max().item() <= TOL


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
