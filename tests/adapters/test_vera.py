"""VeRA beyond the peft oracle (test_peft_family.py: Llama with sliced projections, Qwen2 with
vera_only biases, GPT-2's Conv1D, BERT, projections redrawn from the seed): two adapters beside
LoRA, routing, files with projections of another shape, quantized bases, config errors, refusals.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_matrix import batch, build, evaluate

import tuneforge
from tuneforge.adapters import (
    LoraConfig,
    VeraConfig,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    merge_adapters,
    route_adapters,
    save_adapter,
    set_active_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError, ModelError


def test_vera_two_adapters_beside_lora_route_and_delete():
    """Two VeRA adapters (each its own projections) and a LoRA adapter: they add up, route per row,
    and deleting one leaves the others as they were."""
    model = build("llama")
    add_adapter(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False), "lora")
    lora_only = evaluate(model, "llama")
    outs = {}
    for name, r in (("a", 4), ("b", 6)):
        add_adapter(model, VeraConfig(r=r, target_modules=["q_proj", "v_proj"], init_weights=False), name)
        outs[name] = evaluate(model, "llama")
    set_active_adapters(model, ["a", "lora"])
    both = evaluate(model, "llama")
    assert (both - lora_only).abs().max() > 1e-3 and (both - outs["a"]).abs().max() > 1e-3
    ids = batch("llama", 1)["input_ids"]
    with torch.no_grad(), route_adapters(model, ["b", "a"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], outs["b"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], outs["a"][1], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="already carries a vera adapter"):
        add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "x")
    delete_adapter(model, "b")
    set_active_adapters(model, ["a"])
    assert (evaluate(model, "llama") - outs["a"]).abs().max().item() <= 1e-6
    delete_adapter(model, "a")
    set_active_adapters(model, ["lora"])
    assert (evaluate(model, "llama") - lora_only).abs().max().item() <= 1e-6
    assert not any("vera" in n for n, _ in model.named_modules())


def test_vera_file_with_projections_of_another_shape_is_refused(tmp_path):
    model = add_adapter(build("llama"), VeraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.vera_A"] = torch.zeros(4, 32)
    save_file(tensors, str(weights))
    fresh = build("llama")
    with pytest.raises(ModelError, match=r"base_model\.vera_A has shape \(4, 32\) but the model expects \(4, 64\)"):
        load_adapter(fresh, tmp_path / "a")
    assert list_adapters(fresh) == {}


def test_vera_on_a_quantized_base_trains_and_refuses_merge():
    model = tuneforge.quantize_model(build("llama"), bits=4)
    add_adapter(model, VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"VeraQuantLinear"}
    ids = batch("llama", 1)["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "vera_lambda" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
    with pytest.raises(ConfigError, match="its base weight is quantized"):
        merge_adapters(model)


@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(bias="lora_only"), "bias must be one of \\['none', 'all', 'vera_only'\\]"),
    (dict(save_projection="yes"), "save_projection must be true or false"),
    (dict(vera_dropout=1.5), "vera_dropout must be a number in \\[0, 1\\)"),
    (dict(layers_pattern="layers"), "layers_pattern is set but layers_to_transform is not"),
])
def test_vera_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        VeraConfig(**kw)


def test_vera_refusals_change_nothing():
    model = build("llama")
    with pytest.raises(ConfigError, match="which VeRA does not support yet"):
        add_adapter(model, VeraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="no default target_modules for model type None"):
        add_adapter(build("cnn"), VeraConfig())
    assert list_adapters(model) == {}
    assert tuneforge.VeraConfig is VeraConfig
