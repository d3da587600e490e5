"""Ensemble LoRA (`finetuning_type: lora_ensemble`, lora_ensemble.py): W = W0 + sum_i w_i s_i B_i A_i.

Oracles: the ensemble equals its members built as separate plain LoRA adapters, all active, with the
weights folded into their scaling (outputs and gradients); learned weights get the gradient the chain
rule gives (dL/dw_i = <dL/dB_i, B_i> / w_i) and train; merging is exact and unmerging restores; the
saved file is a plain peft LoRA that peft and tuneforge load to the same outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from adapter_testkit import make_model, tokens, train_steps
from peft import PeftModel

from tuneforge import LoraConfig, LoraEnsembleConfig
from tuneforge.adapters import (
    add_adapter,
    list_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.lora_ensemble import Ensemble
from tuneforge.errors import ConfigError

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc"]}
MEMBERS = [{"r": 2, "lora_alpha": 4}, {"r": 4, "lora_alpha": 3}]
WEIGHTS = [0.5, 2.0]


def _ensemble(kind: str, weights=WEIGHTS, seed: int = 0, **kw):
    model = make_model(kind, seed=seed)
    add_adapter(model, LoraEnsembleConfig(ensemble=MEMBERS, ensemble_weights=weights, target_modules=TARGETS[kind],
                                          init_lora_weights=False, **kw), "ens")
    return model


def _members_of(kind: str, ens_model, weights=WEIGHTS):
    """The same model with each member as a plain LoRA adapter (its weight folded into lora_alpha),
    holding the ensemble's A / B rows and columns, all active."""
    model = make_model(kind)
    names = []
    for i, m in enumerate(MEMBERS):
        name = f"m{i}"
        add_adapter(model, LoraConfig(r=m["r"], lora_alpha=m["lora_alpha"] * weights[i],
                                      target_modules=TARGETS[kind]), name)
        names.append(name)
    layers = dict(adapter_layers(model))
    with torch.no_grad():
        for path, ens in adapter_layers(ens_model, "ens"):
            start = 0
            for i, m in enumerate(MEMBERS):
                layers[path].lora_A[f"m{i}"].copy_(ens.lora_A["ens"][start:start + m["r"]])
                layers[path].lora_B[f"m{i}"].copy_(ens.lora_B["ens"][:, start:start + m["r"]])
                start += m["r"]
    set_active_adapters(model, names)
    return model


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_forward_and_gradients_equal_the_sum_of_members(kind):
    ens = _ensemble(kind)
    members = _members_of(kind, ens)
    ids = tokens()
    got, expected = _loss(ens, ids), _loss(members, ids)
    assert abs(got.item() - expected.item()) < 1e-5
    with torch.no_grad():
        assert (ens(input_ids=ids).logits - members(input_ids=ids).logits).abs().max() < 1e-5
        assert (ens(input_ids=ids).logits - make_model(kind)(input_ids=ids).logits).abs().max() > 1e-3
    got.backward()
    expected.backward()
    mine = dict(adapter_layers(members))
    for path, layer in adapter_layers(ens, "ens"):
        other = mine[path]
        gA = torch.cat([other.lora_A[f"m{i}"].grad for i in range(len(MEMBERS))])
        gB = torch.cat([other.lora_B[f"m{i}"].grad for i in range(len(MEMBERS))], dim=1)
        torch.testing.assert_close(layer.lora_A["ens"].grad, gA, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["ens"].grad, gB, rtol=1e-4, atol=1e-6)


def test_default_weights_are_one_each_and_rslora_scales_each_member():
    ens = _ensemble("llama", weights=None, use_rslora=True)
    layer = next(m for _, m in adapter_layers(ens, "ens"))
    v = next(v for v in layer.lora_variants["ens"] if isinstance(v, Ensemble)).vector(layer, "ens")
    assert layer.lora_scaling["ens"] == 1.0
    expected = [4 / 2 ** 0.5] * 2 + [3 / 4 ** 0.5] * 4  # lora_alpha_i / sqrt(r_i), w_i = 1
    torch.testing.assert_close(v, torch.tensor(expected))


def test_learned_weights_get_the_chain_rule_gradient_and_train():
    ens = _ensemble("llama", weights="learn")
    w = {p: m.lora_ensemble_weight["ens"] for p, m in adapter_layers(ens, "ens")}
    assert all(t.requires_grad and torch.equal(t.detach(), torch.ones(2)) for t in w.values())
    ids = tokens()
    _loss(ens, ids).backward()
    for path, layer in adapter_layers(ens, "ens"):
        B, gB, start = layer.lora_B["ens"], layer.lora_B["ens"].grad, 0
        for i, m in enumerate(MEMBERS):  # out = w_i s_i B_i A_i x: <dL/dB_i, B_i> = w_i dL/dw_i (w_i = 1)
            cols = slice(start, start + m["r"])
            expected = (gB[:, cols] * B[:, cols]).sum()
            torch.testing.assert_close(w[path].grad[i], expected, rtol=1e-4, atol=1e-7)
            start += m["r"]
    before = _loss(ens, ids).item()
    train_steps(ens, steps=4, lr=1e-2)
    assert any((t.detach() - 1).abs().max() > 1e-3 for t in w.values()), "the weights did not train"
    assert _loss(ens, tokens(seed=100)).item() < before + 1.0  # finite, trained


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trained_ensemble_merges_exactly_and_unmerge_restores(kind):
    ens = _ensemble(kind, weights="learn")
    train_steps(ens, steps=2, lr=1e-2)
    weights = {p: m.weight.detach().clone() for p, m in adapter_layers(ens, "ens")}
    ids = tokens()
    with torch.no_grad():
        unmerged = ens(input_ids=ids).logits
        merge_adapters(ens, ["ens"])
        torch.testing.assert_close(ens(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-5)
        unmerge_adapters(ens)
    for p, m in adapter_layers(ens, "ens"):
        torch.testing.assert_close(m.weight, weights[p], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_file_is_the_plain_lora_it_equals_and_peft_loads_it(kind, tmp_path):
    ens = _ensemble(kind, weights="learn")
    train_steps(ens, steps=2, lr=1e-2)
    save_adapter(ens, tmp_path, name="ens")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 6, 6, False)
    ids = tokens()
    with torch.no_grad():
        ours = ens(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(make_model(kind), str(tmp_path))(input_ids=ids).logits
        back = load_adapter(make_model(kind), tmp_path)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(back(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)
    assert type(list_adapters(back)["default"]) is LoraConfig  # it loads as the plain LoRA it is


def test_a_quantized_base_trains_the_ensemble():
    from tuneforge.quant import quantize_model

    model = make_model("llama")
    quantize_model(model, bits=4)
    add_adapter(model, LoraEnsembleConfig(ensemble=MEMBERS, ensemble_weights="learn", target_modules=["q_proj"]))
    layer = next(m for _, m in adapter_layers(model, "default"))
    assert layer.cannot_merge() is not None
    train_steps(model, steps=2, lr=1e-2)
    assert (layer.lora_ensemble_weight["default"].detach() - 1).abs().max() > 0


@pytest.mark.parametrize("kw,message", [
    ({"ensemble": [{"r": 4, "lora_dropout": 0.1}]}, "ensemble[0] sets 'lora_dropout', which a member cannot set"),
    ({"ensemble": [{"r": 0}]}, "ensemble[0].r must be a positive integer"),
    ({"ensemble": []}, "ensemble must be a non-empty list"),
    ({"ensemble_weights": [1.0]}, "ensemble_weights must be 'learn' or a list of 2 numbers"),
    ({"use_dora": True}, "use_dora is not supported for a LoRA ensemble"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' (taken from the base weight) is not supported"),
])
def test_bad_configs_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError) as err:
        LoraEnsembleConfig(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_embedding_target_is_refused_before_anything_changes():
    model = make_model("llama")
    with pytest.raises(ConfigError, match=r"adapts linear layers only; target model.embed_tokens \(Embedding\) cannot"):
        add_adapter(model, LoraEnsembleConfig(target_modules=["q_proj", "embed_tokens"]))
    assert not list(adapter_layers(model))


def test_active_beside_a_plain_lora_on_the_same_layers_it_adds_both_updates():
    """An ensemble and a plain LoRA active together on one layer: each adds its own update (the
    layer gives the plain one to LoRA's maths, the ensemble's to its variant)."""
    model = _ensemble("llama")
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS["llama"], init_lora_weights=False), "p")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, layer.in_features)
    ens = next(v for v in layer.lora_variants["ens"] if isinstance(v, Ensemble))
    with torch.no_grad():
        plain = (x @ layer.lora_A["p"].T @ layer.lora_B["p"].T) * 2.0
        own = x @ layer.lora_A["ens"].T @ ens.folded_b(layer, "ens").T
        for active in (("p", "ens"), ("ens", "p")):
            layer.set_active(active)
            torch.testing.assert_close(layer(x), x @ layer.weight.T + plain + own)

