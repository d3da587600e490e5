"""VeRA through the method seams, checked against peft's VeraConfig four ways on tiny Llama (q/v of
different widths: the shared projections are sliced), Qwen2 (vera_only biases), GPT-2 (Conv1D)
and BERT (classifier in modules_to_save), and without saved projections (redrawn from the seed):
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout);
2. tuneforge trains and saves -> peft loads -> same outputs;
3. peft trains and saves -> tuneforge loads -> same outputs;
4. merge == unmerged, unmerge restores the base weights, disable == base model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft import VeraConfig as PeftVeraConfig
from safetensors.torch import load_file, save_file
from test_matrix import assert_peft_file_loads, assert_same_as_peft, batch, build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    LoraConfig,
    VeraConfig,
    add_adapter,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    merge_adapters,
    route_adapters,
    save_adapter,
    set_active_adapters,
    unload,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5
CASES = {
    "llama": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "qwen2": dict(r=4, target_modules=["q_proj", "v_proj"], bias="vera_only"),
    "gpt2": dict(r=4, target_modules=["c_attn", "mlp.c_proj"]),
    "bert": dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "llama-no-projection": dict(r=8, target_modules=["k_proj", "o_proj"], save_projection=False,
                                projection_prng_key=7, layers_to_transform=[1], layers_pattern="layers"),
}


def pair(kind: str, kw: dict):
    """(ours, peft) with identical base weights, projections and (random) scaling vectors."""
    ours = add_adapter(build(kind), VeraConfig(**kw))
    theirs = get_peft_model(build(kind), PeftVeraConfig(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("case", list(CASES))
def test_vera_matches_peft(tmp_path, case):
    kind, kw = case.split("-")[0], CASES[case]
    warnings.simplefilter("ignore")  # peft warns that save_projection=False relies on the seed

    # 1. same weights: same outputs and gradients (the projections are drawn as peft draws them)
    ours, theirs = pair(kind, kw)
    assert {n for n, _ in adapter_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "vera_lambda_b")
    }
    proj = next(m for _, m in adapter_layers(ours)).vera_projections["default"]
    torch.testing.assert_close(proj.vera_A, theirs.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(proj.vera_B, theirs.base_model.vera_B["default"], atol=0, rtol=0)
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours, theirs, kind, base)
    assert all(g.abs().max() > 0 for k, g in g_ours.items() if ".vera_lambda" in k)
    assert ("base_model.vera_A" in adapter_state_dict(ours)) == kw.get("save_projection", True)

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), VeraConfig(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "VERA" and written["r"] == kw["r"]
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(build(kind), PeftVeraConfig(**kw))
    assert_peft_file_loads(theirs, kind, VeraConfig, tmp_path)

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "vera_" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=1e-6, msg=k)
    with disable_adapters(ours):  # biases trained with vera_only were trained in place (as peft's)
        off = evaluate(ours, kind)
    assert ((off - base).abs().max().item() <= 1e-6) == (kw.get("bias", "none") == "none")
    merged = evaluate(unload(ours, merge=True), kind)
    assert (merged - trained).abs().max().item() <= TOL
    assert not any("vera" in k for k in ours.state_dict())


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
