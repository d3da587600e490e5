"""LoHa and LoKr on a quantized base (QuantLinear, tuneforge.quant): the same outputs and gradients
as on the dequantized model, adapters kept when the base is quantized after adding them, merging
refused with one line, and exact after dequantize_model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from adapter_testkit import logits, make_model, tokens

from tuneforge import adapters as A
from tuneforge.adapters.loha import LoHaQuantLinear
from tuneforge.adapters.lokr import LoKrQuantLinear
from tuneforge.errors import ConfigError
from tuneforge.quant import QuantLinear, dequantize_model, quantize_model

CONFIGS = {
    "loha": (A.LoHaConfig(r=4, target_modules="all-linear", init_weights=False), LoHaQuantLinear),
    "lokr": (A.LoKrConfig(r=2, decompose_both=True, target_modules="all-linear", init_weights=False), LoKrQuantLinear),
}  # fmt: skip


@pytest.mark.parametrize("method", list(CONFIGS))
def test_lycoris_on_a_4bit_base_equals_the_dequantized_model(method):
    cfg, layer_cls = CONFIGS[method]
    model = make_model("llama")
    quantize_model(model, compute_dtype="float32", backend="native")
    ref = dequantize_model(copy.deepcopy(model))
    for m in (model, ref):
        torch.manual_seed(3)
        A.add_adapter(m, cfg)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), layer_cls)
    ids = tokens()
    expected = logits(model, ids)
    torch.testing.assert_close(expected, logits(ref, ids), rtol=1e-5, atol=1e-5)
    for m in (model, ref):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and ours
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()

    with pytest.raises(ConfigError, match="quantized .*4-bit nf4.*dequantize_model"):
        A.merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected)  # nothing was half merged
    dequantize_model(model)
    A.merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_quantize_after_adding_loha_keeps_the_adapter():
    model = make_model("llama")
    torch.manual_seed(1)
    A.add_adapter(model, A.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "hada_" in n}
    quantize_model(model, compute_dtype="float32")
    after = {n: p for n, p in model.named_parameters() if "hada_" in n}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), QuantLinear)
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(dequantize_model(copy.deepcopy(model)), ids),
                               rtol=1e-5, atol=1e-5)


def test_quantized_base_table_lists_the_methods_with_a_quantized_layer():
    """adapter_methods.QUANTIZED_BASE (read by config validation without torch) names every
    registered method whose layer table has QuantLinear, and otherwise only methods that adapt no
    Linear layer (LN tuning: the norms are never quantized; prompt / prefix: virtual tokens)."""
    from tuneforge.adapter_methods import QUANTIZED_BASE

    with_quant = {m.name for m in A.all_methods() if QuantLinear in m.layers}
    no_linear = {m.name for m in A.all_methods() if nn.Linear not in m.layers}
    assert with_quant <= set(QUANTIZED_BASE) <= with_quant | no_linear
