"""IA3 beyond the peft oracle (test_peft_family.py: Llama, Qwen2, GPT-2, BERT with peft's default
and with explicit targets): IA3 beside LoRA, routing, config errors and refusals.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_matrix import batch, build, evaluate

import tuneforge
from tuneforge.adapters import (
    IA3Config,
    LoraConfig,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    route_adapters,
    save_adapter,
    set_active_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError, ModelError


def test_ia3_beside_lora_two_adapters_route_and_delete():
    """Two methods on one model (not on one layer): both active add up, per-sample routing picks
    one per row, deleting the IA3 adapter gives the LoRA model back."""
    model = build("llama")
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    lora_only = evaluate(model, "llama")
    add_adapter(model, IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), "ia3")
    with torch.no_grad():
        for _, m in adapter_layers(model, "ia3"):
            m.ia3_l["ia3"].uniform_(0.5, 1.5)
    ia3_only = evaluate(model, "llama")
    set_active_adapters(model, ["lora", "ia3"])
    both = evaluate(model, "llama")
    assert (both - lora_only).abs().max() > 1e-3 and (both - ia3_only).abs().max() > 1e-3
    ids = batch("llama", 1)["input_ids"]
    with torch.no_grad(), route_adapters(model, ["ia3", "lora"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], ia3_only[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], lora_only[1], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="already carries a lora adapter"):
        add_adapter(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "x")
    delete_adapter(model, "ia3")
    set_active_adapters(model, ["lora"])
    assert (evaluate(model, "llama") - lora_only).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=["q_proj"], feedforward_modules=["down_proj"]), "must be a subset of target_modules"),
    (dict(feedforward_modules="all-linear"), "'all-linear' is only valid for target_modules, not feedforward"),
    (dict(init_ia3_weights="yes"), "init_ia3_weights must be true or false"),
    (dict(target_modules=""), "target_modules must not be an empty string"),
    (dict(exclude_modules="("), "exclude_modules='\\(' is not a valid regex"),
])
def test_ia3_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        IA3Config(**kw)


def test_ia3_refusals_change_nothing(tmp_path):
    model = build("llama")
    with pytest.raises(ConfigError, match="which IA3 does not support yet.*Linear"):
        add_adapter(model, IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    assert list_adapters(model) == {}
    cnn = build("cnn")
    with pytest.raises(ConfigError, match="no default target_modules for model type None"):
        add_adapter(cnn, IA3Config())
    ours = add_adapter(build("llama"), IA3Config())
    save_adapter(ours, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "init_ia3_weights": 3}))
    with pytest.raises(ModelError, match="init_ia3_weights must be true or false"):
        load_adapter(build("llama"), tmp_path / "a")
    cfg_file.write_text(json.dumps({**raw, "peft_type": "LORA"}))  # IA3 tensors under a LoRA config
    with pytest.raises(ModelError):
        load_adapter(build("llama"), tmp_path / "a")


def test_ia3_config_is_exported():
    assert tuneforge.IA3Config is IA3Config
