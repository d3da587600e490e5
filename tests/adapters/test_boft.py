"""BOFT beyond the peft oracle (test_peft_family.py: Llama, Qwen2, BERT with 1, 2 and 3 butterfly
factors): what peft's CPU fallback trains, the butterfly permutation, two adapters and dropout,
config errors, refusals, quantized bases.
"""

from __future__ import annotations

import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import get_peft_model
from test_matrix import build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    BOFTConfig,
    add_adapter,
    list_adapters,
    merge_adapters,
    set_active_adapters,
    unmerge_adapters,
)
from tuneforge.adapters.boft import butterfly_perm
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError

TOL = 1e-5


def test_peft_cpu_fallback_trains_one_factor(monkeypatch):
    """What peft does without its CUDA extension: boft_n_butterfly_factor=2 becomes 1."""
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", None)
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)
    theirs = get_peft_model(build("llama"), PeftBOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                                                           target_modules=["q_proj"]))
    assert {m.boft_R["default"].shape[0] for m in theirs.modules() if hasattr(m, "boft_R")} == {1}


@pytest.mark.parametrize("n,blocks,half", [(16, 2, 2), (64, 4, 4), (64, 2, 8), (128, 8, 2)])
def test_butterfly_perm_is_peft_s(n, blocks, half):
    layer = peft_boft.BOFTLayer.__new__(peft_boft.BOFTLayer)
    assert torch.equal(butterfly_perm(n, blocks, half), layer.block_butterfly_perm(n, blocks, half, 1))


def test_boft_two_adapters_merge_and_dropout():
    model = build("qwen2")
    for name, seed in (("a", 1), ("b", 2)):
        add_adapter(model, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "o_proj"],
                                      init_weights=False, boft_dropout=0.5), name)
    set_active_adapters(model, ["a", "b"])
    both = evaluate(model, "qwen2")
    set_active_adapters(model, ["a"])
    assert (evaluate(model, "qwen2") - both).abs().max() > 1e-3
    set_active_adapters(model, ["a", "b"])
    merge_adapters(model)
    assert (evaluate(model, "qwen2") - both).abs().max().item() <= TOL
    unmerge_adapters(model)
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer.rotate("a", x), layer.rotate("a", x))
        assert not torch.equal(layer.rotate("a", x, dropout=True), layer.rotate("a", x))


@pytest.mark.parametrize("kw, match", [
    (dict(boft_block_size=4, boft_block_num=16), "set exactly one of boft_block_size and boft_block_num"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be an integer >= 1"),
    (dict(boft_dropout=-0.1), "boft_dropout must be a number in \\[0, 1\\)"),
    (dict(bias="oft_only"), "bias must be one of \\['none', 'all', 'boft_only'\\]"),
])
def test_boft_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        BOFTConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(boft_block_size=6), "BOFT cannot adapt model.layers.0.self_attn.q_proj: in_features 64 is not divisible "
                              "by boft_block_size 6"),
    (dict(boft_block_size=16, boft_n_butterfly_factor=4), "is not a multiple of boft_block_size x "
                                                          "2\\^\\(boft_n_butterfly_factor - 1\\) = 128"),
    (dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=5), "must be a multiple of"),
])
def test_boft_refusals_change_nothing(kw, match):
    model = build("llama")
    with pytest.raises(ConfigError, match=match):
        add_adapter(model, BOFTConfig(target_modules=["q_proj"], **kw))
    assert list_adapters(model) == {} and not list(adapter_layers(model))
    with pytest.raises(ConfigError, match="is a Conv1D, which BOFT does not support yet"):
        add_adapter(build("gpt2"), BOFTConfig(target_modules=["c_attn"]))


def test_boft_on_quantized_base():
    """Rotations and scales train over frozen 4-bit codes; merge is refused until dequantized."""
    from tuneforge import dequantize_model, quantize_model

    model = quantize_model(build("llama"), compute_dtype="float32")
    add_adapter(model, BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"],
                                  init_weights=False))
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"BOFTQuantLinear"}
    train(model, "llama", steps=1)
    quantized = evaluate(model, "llama")
    with pytest.raises(ConfigError, match="cannot merge into .*q_proj: its base weight is quantized"):
        merge_adapters(model)
    dequantize_model(model)
    assert (evaluate(model, "llama") - quantized).abs().max().item() <= 1e-4
    merge_adapters(model)
    assert (evaluate(model, "llama") - quantized).abs().max().item() <= 1e-4


def test_boft_config_is_exported():
    assert tuneforge.BOFTConfig is BOFTConfig
