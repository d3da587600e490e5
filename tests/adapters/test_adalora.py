"""AdaLoRA against peft 0.21.2 (peft's AdaLoraModel as the oracle), on tiny Llama and GPT-2 models:
forward and gradients with the same tensors, files both ways, merge; the orthogonality regulariser;
the rank allocator driven step by step with identical gradients (the same singular values masked,
the total rank at the budget after total_step, the pruned file loading in peft and tuneforge)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from test_matrix import TOL, assert_peft_file_loads, assert_same_as_peft, batch, build, evaluate, loss
from test_matrix import same_random_adapters, train

from tuneforge.adapters import (
    AdaLoraConfig,
    add_adapter,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from tuneforge.adapters import adalora_allocator as allocator
from tuneforge.adapters import training_hooks
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def kw(kind: str, **extra) -> dict:
    return dict(init_r=4, target_r=2, lora_alpha=6, target_modules=TARGETS[kind], total_step=8, **extra)


def pair(kind: str, **extra):
    ours = add_adapter(build(kind), AdaLoraConfig(**kw(kind, **extra)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(build(kind), PeftAdaLoraConfig(**kw(kind, **extra)))
    return same_random_adapters(ours, theirs, std=0.2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matches_peft(tmp_path, kind):
    ours1, theirs1 = pair(kind)
    base = evaluate(build(kind), kind)
    grads = assert_same_as_peft(ours1, theirs1, kind, base)
    assert {k.rsplit(".", 1)[1] for k in grads} == {"lora_A", "lora_E", "lora_B"}

    ours = add_adapter(build(kind), AdaLoraConfig(**kw(kind)))  # E starts at zero: the base model
    assert (evaluate(ours, kind) - base).abs().max().item() == 0
    train(ours, kind)
    trained = evaluate(ours, kind)
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["init_r"] == 4 and written["rank_pattern"] is None
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(build(kind), PeftAdaLoraConfig(**kw(kind)))
    assert_peft_file_loads(theirs, kind, AdaLoraConfig, tmp_path)

    weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    for k, v in ours.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0, msg=k)


def test_orthogonal_regulariser_equals_peft():
    ours, theirs = pair("llama", orth_reg_weight=0.3)
    ids = batch("llama", 3)["input_ids"]
    with torch.no_grad():
        with_reg = theirs.base_model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds it
        plain = theirs.base_model.model(input_ids=ids, labels=ids).loss
    got = training_hooks.training_loss(ours)
    assert got is not None and got.requires_grad
    torch.testing.assert_close(got.detach(), with_reg - plain, atol=1e-5, rtol=1e-5)
    assert got.item() > 0.1  # random A, B are far from orthogonal: the case proves something


def _kept(model, name="default") -> dict[str, list[bool]]:
    return {p: (m.lora_E[name].detach().view(-1) != 0).tolist() for p, m in adapter_layers(model, name)}


def test_allocator_masks_as_peft_and_ends_at_budget(tmp_path):
    total, extra = 8, dict(tinit=1, tfinal=2, deltaT=1, beta1=0.8, beta2=0.7)
    ours, theirs = pair("llama", **extra)
    theirs_params = dict(theirs.named_parameters())
    masks = []
    for step in range(1, total + 1):
        loss(ours, "llama", batch("llama", 200 + step)).backward()
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if p.requires_grad:
                    p.sub_(0.05 * p.grad)  # the same SGD step on both sides
                    q = theirs_params["base_model.model." + n]
                    q.copy_(p)
                    q.grad = p.grad.clone()
        training_hooks.after_step(ours, step, total)
        theirs.base_model.update_and_allocate(step)
        kept_ours = _kept(ours)
        kept_theirs = {p: (m.lora_E["default"].detach().view(-1) != 0).tolist()
                       for p, m in ((n.removeprefix("base_model.model."), m) for n, m in theirs.named_modules())
                       if hasattr(m, "lora_E") and "default" in m.lora_E}  # fmt: skip
        assert kept_ours == kept_theirs, f"step {step}"
        masks.append(sum(map(sum, kept_ours.values())))
        ours.zero_grad()
    n = len(list(adapter_layers(ours)))
    assert masks[0] == 4 * n  # warm-up (tinit): nothing pruned
    assert masks[-1] == 2 * n  # target_r x adapted matrices after total_step
    assert masks == sorted(masks, reverse=True) and len(set(masks)) > 2  # pruned over several steps

    save_adapter(ours, tmp_path / "pruned")
    written = json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {f"{p}.lora_E": k for p, k in _kept(ours).items()}
    ours.eval()
    expected = evaluate(ours, "llama")
    peft_loaded = PeftModel.from_pretrained(build("llama"), str(tmp_path / "pruned")).eval()
    assert (evaluate(peft_loaded, "llama") - expected).abs().max().item() <= TOL
    mine = load_adapter(build("llama"), tmp_path / "pruned")
    assert {m.lora_A["default"].shape[0] for _, m in adapter_layers(mine)} <= {0, 1, 2, 3, 4}
    assert sum(m.lora_A["default"].shape[0] for _, m in adapter_layers(mine)) == 2 * n
    assert (evaluate(mine, "llama") - expected).abs().max().item() <= TOL
    save_adapter(mine, tmp_path / "again")  # re-saved at the pruned ranks: peft still loads it
    again = PeftModel.from_pretrained(build("llama"), str(tmp_path / "again")).eval()
    assert (evaluate(again, "llama") - expected).abs().max().item() <= TOL


def test_config_errors():
    with pytest.raises(ConfigError, match="target_r"):
        AdaLoraConfig(init_r=4, target_r=8, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="tinit"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="beta1"):
        AdaLoraConfig(beta1=1.0, target_modules=["q_proj"])
    model = add_adapter(build("llama"), AdaLoraConfig(tinit=3, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="tinit"):  # total_step from the loop: 3 steps leave none to prune
        allocator.update_and_allocate(model, "default", AdaLoraConfig(tinit=3, target_modules=["q_proj"]), 1, 3)


def test_on_a_quantized_base_equals_the_dequantized_model():
    """AdaLoRA over QuantLinear (4-bit NF4) gives the dequantized model's outputs and gradients;
    merging into the quantized weight is refused with one line."""
    from tuneforge.adapters.adalora import AdaLoraLinear, AdaLoraQuantLinear
    from tuneforge.quant import dequantize_model, quantize_model

    base = quantize_model(build("llama"), compute_dtype="float32", backend="native", bits=4, quant_type="nf4")
    ref = dequantize_model(__import__("copy").deepcopy(base))
    cfg = dict(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    for m in (base, ref):
        torch.manual_seed(5)
        add_adapter(m, AdaLoraConfig(**cfg))
    assert {type(m) for _, m in adapter_layers(base)} == {AdaLoraQuantLinear}
    assert {type(m) for _, m in adapter_layers(ref)} == {AdaLoraLinear}
    b = batch("llama", 4)
    got, expected = loss(base, "llama", b), loss(ref, "llama", b)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.backward()
    expected.backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in base.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.grad, g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
    with pytest.raises(ConfigError, match="quantized"):
        merge_adapters(base)


def test_a_resumed_run_keeps_its_pruned_ranks():
    """Without the allocator's saved state (a checkpoint written before it was saved), a run resumed in
    its final phase takes the masked ranks from the zero rows of lora_E, keeps them at zero and saves
    the pruned file."""
    cfg = AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=6, tfinal=2)
    model = add_adapter(build("llama"), cfg)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.lora_E["default"].copy_(torch.tensor([[1.0], [0.0], [2.0], [0.0]]))
            m.lora_A["default"].normal_()
    training_hooks.after_step(model, 5, 6)  # resumed at step 5 (> total_step - tfinal)
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.lora_E["default"].add_(0.5)  # an optimizer step would regrow them
    training_hooks.after_step(model, 6, 6)
    assert set(map(tuple, _kept(model).values())) == {(True, False, True, False)}
    assert {tuple(m.peft_tensors("default")["lora_A"].shape) for _, m in adapter_layers(model)} == {(2, 64)}
