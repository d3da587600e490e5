"""IA3 through the method seams, checked against peft four ways (as test_matrix.py does for LoRA):
tiny Llama, Qwen2, GPT-2 (Conv1D) and BERT (classifier in modules_to_save), with peft's default
targets and with explicit ones.
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout);
2. tuneforge trains and saves -> peft loads -> same outputs;
3. peft trains and saves -> tuneforge loads -> same outputs;
4. merge == unmerged, unmerge restores the base weights, disable == base model.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import (
    PeftModel,
    get_peft_model,
    set_peft_model_state_dict,
)
from test_matrix import assert_peft_file_loads, assert_same_as_peft, batch, build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    IA3Config,
    LoraConfig,
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
EXPLICIT = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], feedforward_modules=["down_proj"]),
    "qwen2": dict(target_modules=["k_proj", "o_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    "bert": dict(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]),
}
CASES = [(k, v) for k in EXPLICIT for v in ("default", "explicit")]


def config(kind: str, variant: str) -> dict:
    kw = dict(EXPLICIT[kind]) if variant == "explicit" else {}
    if kind == "bert":
        kw["modules_to_save"] = ["classifier"]
    return kw


def pair(kind: str, kw: dict):
    """(ours, peft) with identical base weights and identical (random, not all-ones) vectors."""
    ours = add_adapter(build(kind), IA3Config(**kw))
    theirs = get_peft_model(build(kind), PeftIA3Config(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("kind,variant", CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_ia3_matches_peft(tmp_path, kind, variant):
    kw = config(kind, variant)

    # 1. same weights: same outputs and gradients
    ours, theirs = pair(kind, kw)
    assert {n for n, _ in adapter_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "ia3_l")
    }
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours, theirs, kind, base)
    assert any(".ia3_l" in k for k in g_ours)
    assert all(g.abs().max() > 0 for k, g in g_ours.items() if ".ia3_l" in k)

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), IA3Config(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3"
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(build(kind), PeftIA3Config(**kw))
    assert_peft_file_loads(theirs, kind, IA3Config, tmp_path)

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "ia3_" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=1e-6, msg=k)
    with disable_adapters(ours):
        assert (evaluate(ours, kind) - evaluate(build(kind), kind)).abs().max().item() <= 1e-6
    assert (evaluate(ours, kind) - trained).abs().max().item() <= 1e-6
    merged = evaluate(unload(ours, merge=True), kind)
    assert (merged - trained).abs().max().item() <= TOL


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
