"""BitFit against hand maths (peft has no BitFit) on tiny Llama (no biases: zero ones are added),
Qwen2 (q/k/v biases), GPT-2 (Conv1D and LayerNorm biases) and BERT (classifier in modules_to_save):
1. output == the base model whose targeted biases are bias + delta (a zero bias where it had none);
2. d loss / d delta == autograd's gradient of that model's own bias;
3. save -> load round trip (peft_type BITFIT, peft's key layout);
4. merge (bias += delta) == unmerged, unmerge restores, disable == base, unload(merge=False) gives
   back the base model's parameters (added biases removed).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from test_matrix import batch, build, evaluate, loss, train

import tuneforge
from tuneforge.adapters import (
    BitFitConfig,
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
from tuneforge.errors import ConfigError

TOL = 1e-5
CASES = {
    "llama-attention": dict(target_modules="attention"),
    "llama-mlp": dict(target_modules="mlp"),
    "qwen2-names": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2-all": dict(target_modules="all"),
    "bert-all": dict(target_modules="all", modules_to_save=["classifier"]),
}
EXPECTED = {  # the leaf names each keyword selects (per block)
    "llama-attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "llama-mlp": {"gate_proj", "up_proj", "down_proj"},
    "qwen2-names": {"q_proj", "v_proj", "down_proj"},
    "gpt2-all": {"c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"},
    "bert-all": {"query", "key", "value", "dense", "LayerNorm"},
}


def moved(kind: str, kw: dict, seed: int = 0):
    """A BitFit model whose deltas are random, and {path: delta}."""
    model = add_adapter(build(kind), BitFitConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for path, m in adapter_layers(model):
            m.bitfit_bias["default"].add_(torch.randn(m.bitfit_bias["default"].shape, generator=g) * 0.3)
            deltas[path] = m.bitfit_bias["default"].detach().clone()
    return model, deltas


def by_hand(kind: str, deltas: dict) -> nn.Module:
    """The base model with bias + delta on the adapted layers (a trainable bias), nothing else trainable."""
    model = build(kind)
    model.requires_grad_(False)
    for path, delta in deltas.items():
        m = model.get_submodule(path)
        own = m.bias.detach() if m.bias is not None else torch.zeros_like(delta)
        m.bias = nn.Parameter(own + delta)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_bitfit_is_bias_plus_delta(tmp_path, case):
    kind, kw = case.split("-")[0], CASES[case]
    base = evaluate(build(kind), kind)
    ours, deltas = moved(kind, kw)
    assert {p.rsplit(".", 1)[-1] for p in deltas} == EXPECTED[case]
    assert all("classifier" not in p and "lm_head" not in p for p in deltas)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".bitfit_bias." in n or ".modules_to_save." in n for n in trainable)

    # 1. output = base with bias + delta on the adapted layers
    ref = by_hand(kind, deltas)
    got = evaluate(ours, kind)
    assert (got - base).abs().max() > 1e-3
    assert (got - evaluate(ref, kind)).abs().max().item() <= TOL

    # 2. d loss / d delta = d loss / d bias of the hand-built model (a classifier copy trains in ours only)
    if kind == "bert":
        ref.classifier.load_state_dict(ours.classifier.modules_to_save["default"].state_dict())
    b = batch(kind, 7)
    loss(ours, kind, b).backward()
    loss(ref, kind, b).backward()
    for path, m in adapter_layers(ours):
        expected = ref.get_submodule(path).bias.grad
        assert expected.abs().max() > 0
        torch.testing.assert_close(m.bitfit_bias["default"].grad, expected, atol=1e-6, rtol=1e-4, msg=path)
    ours.zero_grad()

    # 3. save -> load
    save_adapter(ours, tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["peft_type"] == "BITFIT" and written["target_modules"] == kw["target_modules"]
    loaded = load_adapter(build(kind), tmp_path / "a")
    assert isinstance(list_adapters(loaded)["default"], BitFitConfig)
    assert (evaluate(loaded, kind) - got).abs().max().item() <= 1e-6

    # 4. merge == unmerged, unmerge restores, disable == base, unload gives the base back
    before = {k: v.clone() for k, v in ours.state_dict().items() if "bitfit_" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - got).abs().max().item() <= TOL
    unmerge_adapters(ours)
    after = ours.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0, msg=k)
    with disable_adapters(ours):
        assert (evaluate(ours, kind) - base).abs().max().item() <= 1e-6
    plain = build(kind).state_dict()
    assert set(unload(loaded, merge=False).state_dict()) == set(plain)
    assert (evaluate(unload(ours, merge=True), kind) - got).abs().max().item() <= TOL


def test_bitfit_trains_and_says_once_that_biases_were_added(caplog):
    model = build("llama")
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        add_adapter(model, BitFitConfig())
    notes = [r.getMessage() for r in caplog.records if "BitFit" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith("BitFit: 14 of 14 targeted layers have no bias")
    before = evaluate(model, "llama")
    train(model, "llama")
    assert (evaluate(model, "llama") - before).abs().max() > 1e-4


def test_bitfit_on_a_half_precision_base():
    """Added biases take the weight's dtype; the deltas train in fp32; the output keeps the base dtype."""
    model = add_adapter(build("llama").to(torch.bfloat16), BitFitConfig(target_modules="mlp"))
    deltas = [p for n, p in model.named_parameters() if ".bitfit_bias." in n]
    assert deltas and all(p.dtype == torch.float32 and p.requires_grad for p in deltas)
    assert all(m.bias.dtype == torch.bfloat16 for _, m in adapter_layers(model))
    ids = batch("llama", 1)["input_ids"]
    out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in deltas)


def test_bitfit_two_adapters_beside_lora_route_and_delete():
    model = build("qwen2")
    add_adapter(model, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False), "lora")
    lora_only = evaluate(model, "qwen2")
    outs = {}
    for name, seed in (("a", 1), ("b", 2)):
        add_adapter(model, BitFitConfig(target_modules=["q_proj", "k_proj", "down_proj"]), name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in adapter_layers(model, name):
                m.bitfit_bias[name].add_(torch.randn(m.bitfit_bias[name].shape, generator=g))
        outs[name] = evaluate(model, "qwen2")
    set_active_adapters(model, ["a", "lora"])
    both = evaluate(model, "qwen2")
    assert (both - lora_only).abs().max() > 1e-3 and (both - outs["a"]).abs().max() > 1e-3
    ids = batch("qwen2", 1)["input_ids"]
    with torch.no_grad(), route_adapters(model, ["b", "a"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], outs["b"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], outs["a"][1], atol=1e-5, rtol=0)
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    set_active_adapters(model, ["lora"])
    assert (evaluate(model, "qwen2") - lora_only).abs().max().item() <= 1e-6


def test_bitfit_on_a_quantized_base_merges_exactly():
    model = tuneforge.quantize_model(build("llama"), bits=4, compute_dtype="float32")  # the bias adds in fp32
    add_adapter(model, BitFitConfig(target_modules="attention"))
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"BitFitQuantLinear"}
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.bitfit_bias["default"].normal_()
    got = evaluate(model, "llama")
    merge_adapters(model)
    assert (evaluate(model, "llama") - got).abs().max().item() <= TOL


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=[]), "target_modules must name at least one module"),
    (dict(target_modules="("), "target_modules='\\(' is not a valid regex"),
    (dict(exclude_modules=[""]), "exclude_modules must hold non-empty strings"),
])
def test_bitfit_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        BitFitConfig(**kw)


def test_bitfit_refusals_change_nothing():
    model = build("llama")
    with pytest.raises(ConfigError, match="which BitFit does not support yet"):
        add_adapter(model, BitFitConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="'attention' selects no layer of SmallCNN"):
        add_adapter(build("cnn"), BitFitConfig(target_modules="attention"))
    assert list_adapters(model) == {} and "model.layers.0.self_attn.q_proj.bias" not in model.state_dict()
    assert tuneforge.BitFitConfig is BitFitConfig
