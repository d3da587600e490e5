"""Dynamic LoRA (DyLoRA, `finetuning_type: lora_dynamic`, lora_dynamic.py).

Oracles: the rank schedule's values by hand; at each training step only the first b(t) <= r(t)
components get gradients and change (AdamW with weight decay, whose moments would move the others:
they are put back); the adapter at rank k equals the plain peft LoRA made of its first k components
(alpha / k), which is also what it saves at rank k, and peft and tuneforge load that file to equal
outputs; merging at the rank in use is exact and unmerging restores; bad settings are refused in
one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from adapter_testkit import make_model, tokens
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from tuneforge import LoraConfig, LoraDynamicConfig, set_dynamic_rank
from tuneforge.adapters import (
    add_adapter,
    list_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    training_hooks,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.lora_dynamic import check_spec, dynamic_rank, eval_ranks, rank_reached, rank_trained
from tuneforge.errors import ConfigError, ModelError

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc"]}
SPEC = {"min": 2, "max": 6, "schedule": "linear"}


def _dynamic(kind: str, spec=SPEC, **kw):
    model = make_model(kind)
    add_adapter(model, LoraDynamicConfig(dynamic_rank=spec, lora_alpha=12, target_modules=TARGETS[kind],
                                         init_lora_weights=False, **kw), "dyn")
    return model


def _loop(model, steps: int, weight_decay: float = 0.1, check=None):
    """What the training loop does with the method hooks: before_step, forward / backward, AdamW step,
    after_step; `check(step, model, optimizer)` runs after the backward, before the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    model.train()
    for step in range(1, steps + 1):
        training_hooks.before_step(model, step, steps)
        ids = tokens(seed=100 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        before = {p: (m.lora_A["dyn"].detach().clone(), m.lora_B["dyn"].detach().clone())
                  for p, m in adapter_layers(model, "dyn")}
        if check is not None:
            check(step, model, opt)
        opt.step()
        training_hooks.after_step(model, step, steps)
        opt.zero_grad(set_to_none=True)
        yield step, before
    model.eval()


def test_the_schedule_grows_min_to_max_and_samples_below_the_rank_reached():
    linear = check_spec({"min": 2, "max": 5})
    assert [rank_reached(linear, t, 8) for t in range(1, 9)] == [2, 2, 3, 3, 4, 4, 5, 5]  # 2 steps per rank
    half = check_spec({"min": 2, "max": 5, "until": 0.5})
    assert [rank_reached(half, t, 8) for t in range(1, 9)] == [2, 3, 4, 5, 5, 5, 5, 5]
    cosine = check_spec({"min": 1, "max": 4, "schedule": "cosine"})
    got = [rank_reached(cosine, t, 16) for t in range(1, 17)]
    assert got == sorted(got) and got[0] == 1 and got[-1] == 4
    assert got.count(1) > 16 / 4 and got.count(4) > 16 / 4  # eases in and out: longer at the ends
    constant = check_spec({"min": 1, "max": 4, "schedule": "constant"})
    assert {rank_reached(constant, t, 10) for t in range(1, 11)} == {4}
    drawn = [rank_trained(constant, t, 200) for t in range(1, 201)]
    assert set(drawn) == {1, 2, 3, 4} and drawn == [rank_trained(constant, t, 200) for t in range(1, 201)]
    assert all(2 <= rank_trained(linear, t, 40) <= rank_reached(linear, t, 40) for t in range(1, 41))
    fixed = check_spec({"min": 2, "max": 5, "sample": False})
    assert [rank_trained(fixed, t, 8) for t in range(1, 9)] == [rank_reached(fixed, t, 8) for t in range(1, 9)]
    assert eval_ranks(check_spec({"min": 2, "max": 16, "save": 12})) == [2, 4, 8, 12, 16]
    assert eval_ranks(check_spec({"min": 3, "max": 3})) == [3]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_each_step_trains_only_its_first_components(kind):
    model = _dynamic(kind, spec={"min": 1, "max": 6, "schedule": "linear"})
    spec, seen, moments = check_spec({"min": 1, "max": 6}), set(), []

    def check(step, m, opt):
        b = rank_trained(spec, step, 12)
        seen.add(b)
        for _, layer in adapter_layers(m, "dyn"):
            gA, gB = layer.lora_A["dyn"].grad, layer.lora_B["dyn"].grad
            assert torch.count_nonzero(gA[b:]) == 0 and torch.count_nonzero(gB[:, b:]) == 0
            assert torch.count_nonzero(gA[:b]) > 0 and torch.count_nonzero(gB[:, :b]) > 0
            state = opt.state.get(layer.lora_A["dyn"])
            if state:  # Adam's moment of a component trained before but not now would move it
                moments.append(state["exp_avg"][b:].abs().max().item())

    for step, before in _loop(model, 12, check=check):
        b, reached = rank_trained(spec, step, 12), rank_reached(spec, step, 12)
        assert b <= reached
        for path, layer in adapter_layers(model, "dyn"):
            A, B = layer.lora_A["dyn"].detach(), layer.lora_B["dyn"].detach()
            assert torch.equal(A[b:], before[path][0][b:]) and torch.equal(B[:, b:], before[path][1][:, b:])
            assert not torch.equal(A[:b], before[path][0][:b])
    assert len(seen) > 2 and max(moments) > 0  # ranks varied, and the optimizer had something to undo
    assert dynamic_rank(model, "dyn") == 6  # after the last step: the saved rank (max)


def _peft_lora_of_first(kind: str, model, k: int, alpha: float):
    """peft's LoRA of rank k holding the first k components of `model`'s adapter `dyn`."""
    peft = get_peft_model(make_model(kind), PeftLoraConfig(r=k, lora_alpha=alpha, target_modules=TARGETS[kind],
                                                           fan_in_fan_out=kind == "gpt2"))
    mods = dict(peft.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in adapter_layers(model, "dyn"):
            mods[path].lora_A["default"].weight.copy_(layer.lora_A["dyn"][:k])
            mods[path].lora_B["default"].weight.copy_(layer.lora_B["dyn"][:, :k])
    return peft.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_rank_k_is_the_plain_lora_of_its_first_k_components_and_its_file(kind, tmp_path):
    model = _dynamic(kind)
    for _ in _loop(model, 3):
        pass
    ids = tokens()
    for k in (2, 6):
        set_dynamic_rank(model, k, "dyn")
        with torch.no_grad():
            ours = model(input_ids=ids).logits
            peft = _peft_lora_of_first(kind, model, k, 12)(input_ids=ids).logits
        torch.testing.assert_close(ours, peft, rtol=1e-4, atol=1e-5)
        save_adapter(model, tmp_path / str(k), name="dyn")
        config = json.loads((tmp_path / str(k) / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", k, 12)
        with torch.no_grad():
            theirs = PeftModel.from_pretrained(make_model(kind), str(tmp_path / str(k)))(input_ids=ids).logits
            back = load_adapter(make_model(kind), tmp_path / str(k))
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(back(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-5)
        assert type(list_adapters(back)["default"]) is LoraConfig  # a plain LoRA of rank k
    with torch.no_grad():
        assert (ours - make_model(kind)(input_ids=ids).logits).abs().max() > 1e-3


def test_rslora_scales_by_the_root_of_the_rank(tmp_path):
    model = _dynamic("llama", use_rslora=True)
    set_dynamic_rank(model, 4, "dyn")
    layer = next(m for _, m in adapter_layers(model, "dyn"))
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_A["dyn"].detach()[:4], layer.lora_B["dyn"].detach()[:, :4]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.weight.T + (x @ A.T @ B.T) * 12 / 2.0)
    save_adapter(model, tmp_path, name="dyn")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["use_rslora"]) == (4, True)


def test_active_beside_a_plain_lora_on_the_same_layers_it_adds_its_rank_k_update():
    model = _dynamic("llama")
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS["llama"], init_lora_weights=False), "p")
    set_dynamic_rank(model, 3, "dyn")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_A["dyn"].detach()[:3], layer.lora_B["dyn"].detach()[:, :3]
    pA, pB = layer.lora_A["p"].detach(), layer.lora_B["p"].detach()
    layer.set_active(("p", "dyn"))
    with torch.no_grad():
        expected = x @ layer.weight.T + (x @ pA.T @ pB.T) * 2.0 + (x @ A.T @ B.T) * 12 / 3
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_at_the_rank_in_use_is_exact_and_unmerge_restores(kind):
    model = _dynamic(kind)
    set_dynamic_rank(model, 3, "dyn")
    weights = {p: m.weight.detach().clone() for p, m in adapter_layers(model, "dyn")}
    ids = tokens()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge_adapters(model, ["dyn"])
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, rtol=1e-4, atol=1e-5)
        with pytest.raises(ModelError, match="is merged at rank 3; unmerge it before changing its rank"):
            set_dynamic_rank(model, 5, "dyn")
        unmerge_adapters(model)
    for p, m in adapter_layers(model, "dyn"):
        torch.testing.assert_close(m.weight, weights[p], rtol=0, atol=1e-6)


def test_a_quantized_base_trains_it_and_refuses_to_merge():
    from tuneforge.quant import quantize_model

    model = make_model("llama")
    quantize_model(model, bits=4)
    add_adapter(model, LoraDynamicConfig(dynamic_rank={"min": 1, "max": 8}, target_modules=["q_proj"]), "dyn")
    layer = next(m for _, m in adapter_layers(model, "dyn"))
    assert layer.cannot_merge() is not None
    for _ in _loop(model, 4):
        pass
    top = rank_reached(check_spec({"min": 1, "max": 8}), 4, 4)  # the highest rank reached in 4 steps: 7
    assert top == 7 and layer.lora_B["dyn"].detach()[:, :1].abs().max() > 0
    assert layer.lora_B["dyn"].detach()[:, top:].abs().max() == 0  # a component never reached never trains


@pytest.mark.parametrize("kw,message", [
    ({"dynamic_rank": {"min": 8, "max": 4}}, "dynamic_rank.min must be between 1 and dynamic_rank.max (4), got 8"),
    ({"dynamic_rank": {"max": 0}}, "dynamic_rank.max must be at least 1"),
    ({"dynamic_rank": {"schedule": "exp"}}, "dynamic_rank.schedule must be one of linear, cosine, constant"),
    ({"dynamic_rank": {"step": 2}}, "dynamic_rank has no entry 'step'"),
    ({"dynamic_rank": {"max": 4, "save": 6}}, "dynamic_rank.save must be between dynamic_rank.min (1) and max (4)"),
    ({"dynamic_rank": {"until": 0}}, "dynamic_rank.until must be a fraction of the run in (0, 1]"),
    ({"dynamic_rank": {"max": 4}, "r": 16}, "r (16) and dynamic_rank.max (4) disagree"),
    ({"use_dora": True}, "use_dora is not supported for a Dynamic LoRA"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' (taken from the base weight) is not supported"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern is not supported for a Dynamic LoRA"),
])
def test_bad_settings_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError) as err:
        LoraDynamicConfig(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_set_dynamic_rank_refuses_a_bad_rank_or_adapter_and_embeddings_are_refused():
    model = _dynamic("llama")
    with pytest.raises(ConfigError, match=r"must be an integer in 1\.\.6, got 7"):
        set_dynamic_rank(model, 7, "dyn")
    with pytest.raises(ConfigError, match="adapter 'other' is not a Dynamic LoRA"):
        set_dynamic_rank(model, 2, "other")
    plain = make_model("llama")
    with pytest.raises(ConfigError, match=r"adapts linear layers only; target model.embed_tokens \(Embedding\)"):
        add_adapter(plain, LoraDynamicConfig(target_modules=["q_proj", "embed_tokens"]))
    assert not list(adapter_layers(plain))
