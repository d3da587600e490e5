"""LoHa through the method seams, checked against peft four ways (as test_matrix.py does for LoRA):
tiny Llama (rank/alpha patterns, layers_to_transform), Qwen2 (all-linear), GPT-2 (its Linear head;
its Conv1D layers are refused, as peft refuses them), BERT (classifier in modules_to_save), a CNN
(Conv2d flat and in FedPara's Tucker form) and a Conv1d net.
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout);
2. tuneforge trains and saves -> peft loads -> same outputs;
3. peft trains and saves -> tuneforge loads -> same outputs;
4. merge == unmerged, unmerge restores the base weights, disable == base model.
`check_against_peft` is shared with test_lokr.py.

peft's LoHa computes the Tucker form (use_effective_conv2d) with a hand-written backward whose
gradients for hada_w1_a / hada_w2_a are not the derivative of its forward; tuneforge uses autograd,
so those cases compare with peft whose forward is differentiated by autograd (`exact_peft_cp`).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoHaConfig as PeftLoHaConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from test_matrix import assert_same_as_peft, batch, build, evaluate, train
from torch import nn

import tuneforge
from tuneforge.adapters import (
    LoHaConfig,
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
from tuneforge.adapters.lycoris import tucker
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError

TOL = 1e-5


class Conv1dNet(nn.Module):
    """Takes the CNN's (batch, 3, 8, 8) images as 3 channels of length 64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.point = nn.Conv1d(6, 4, 1)
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(torch.relu(self.conv(x.flatten(2))))
        return self.fc(h.flatten(1))


def make(model: str) -> tuple[nn.Module, str]:
    """(a fresh model, the data kind of test_matrix's batch / evaluate / train)."""
    if model == "conv1d":
        torch.manual_seed(0)
        return Conv1dNet().eval(), "cnn"
    return build(model), model


CNN = ["conv1", "conv2", "mix", "fc"]
CASES = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                  alpha_pattern={"v_proj": 3}, layers_to_transform=[1], layers_pattern="layers"),
    "qwen2": dict(target_modules="all-linear"),
    "gpt2": dict(target_modules=["lm_head"]),
    "bert": dict(target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"]),
    "cnn": dict(target_modules=CNN),
    "cnn-effective": dict(target_modules=CNN, use_effective_conv2d=True),
    "conv1d-effective": dict(target_modules=["conv", "point", "fc"], use_effective_conv2d=True),
}


@pytest.fixture
def exact_peft_cp(monkeypatch):
    """peft's LoHa Tucker weight with autograd's gradients (its forward maths unchanged)."""
    import peft.tuners.loha.layer as peft_loha

    def make_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
        return tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b) * scale

    monkeypatch.setattr(peft_loha, "make_weight_cp", make_weight_cp)


def check_against_peft(tmp_path, ours_cls, peft_cls, case: str, kw: dict, peft_type: str, prefix: str) -> None:
    """The four checks of the module docstring for one (model, config) case; `kw['init_weights']`
    (default True) is the start of the adapters trained in 2. and 3."""
    model = case.split("-")[0]
    kw = {"r": 4, "alpha": 8, **kw}
    start = kw.pop("init_weights", True)

    # 1. same weights: same outputs and gradients
    ours, data = make(model)
    add_adapter(ours, ours_cls(init_weights=False, **kw))
    theirs = get_peft_model(make(model)[0], peft_cls(init_weights=False, **kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    assert {n for n, _ in adapter_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "base_layer")
    }
    base = evaluate(make(model)[0], data)
    g_ours = assert_same_as_peft(ours, theirs, data, base)
    assert any(g.abs().max() > 0 for k, g in g_ours.items() if prefix in k)

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(make(model)[0], ours_cls(init_weights=start, **kw))
    train(ours, data)
    trained = evaluate(ours, data)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == peft_type
    loaded = PeftModel.from_pretrained(make(model)[0], str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, data) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(make(model)[0], peft_cls(init_weights=start, **kw))
    train(theirs, data)
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine = load_adapter(make(model)[0], tmp_path / "peft")
    assert isinstance(list_adapters(mine)["default"], ours_cls)
    assert (evaluate(mine, data) - evaluate(theirs, data)).abs().max().item() <= TOL

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if prefix not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, data) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=0, msg=k)
    with disable_adapters(ours):
        assert (evaluate(ours, data) - base).abs().max().item() <= 1e-6
    merged = evaluate(unload(ours, merge=True), data)
    assert (merged - trained).abs().max().item() <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_loha_matches_peft(tmp_path, case, exact_peft_cp):
    check_against_peft(tmp_path, LoHaConfig, PeftLoHaConfig, case, CASES[case], "LOHA", ".hada_")


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
