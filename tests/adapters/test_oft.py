"""OFT beyond the peft oracle (test_peft_family.py: Llama with its embedding, Qwen2, BERT; block
size + Neumann series, rank + exact Cayley, shared block + COFT + biases): the Cayley maths, two
adapters, routing, module dropout, config errors, refusals (GPT-2's Conv1D: peft has no OFT layer
for it either), quantized bases.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_matrix import batch, build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    LoraConfig,
    OFTConfig,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    merge_adapters,
    route_adapters,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.oft import nearest_divisor
from tuneforge.adapters.orthogonal import cayley, cayley_neumann, skew_from_upper
from tuneforge.errors import ConfigError, ModelError


def test_cayley_and_fit_hand_maths():
    """The exact Cayley transform is orthogonal; peft's Neumann series for small Q is close to
    (I + Q)(I - Q)^-1; block sizes fit to the nearest divisor, the smaller one on a tie."""
    g = torch.Generator().manual_seed(0)
    q = skew_from_upper(torch.randn(3, 6, generator=g) * 0.02, 4)
    torch.testing.assert_close(q, -q.transpose(1, 2))
    r = cayley(q)
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(4).expand(3, 4, 4), atol=1e-6, rtol=0)
    eye = torch.eye(4).expand(3, 4, 4)
    torch.testing.assert_close(cayley_neumann(q, 5), torch.linalg.solve(eye - q, eye + q), atol=1e-4, rtol=0)
    torch.testing.assert_close(cayley_neumann(q, 2), eye + 2 * q)
    torch.testing.assert_close(cayley_neumann(q, 3), cayley_neumann(q, 4))  # peft's count
    assert [nearest_divisor(64, p) for p in (12, 5, 30, 100, 7)] == [8, 4, 32, 64, 8]


def test_oft_two_adapters_merge_route_and_beside_lora():
    """Two OFT adapters rotate in turn; merging both equals running both; per-sample routing picks
    one per row; a LoRA adapter on other layers adds up; deleting the OFT adapters gives it back."""
    model = build("llama")
    add_adapter(model, LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), "lora")
    lora_only = evaluate(model, "llama")
    for name, seed in (("a", 1), ("b", 2)):
        add_adapter(model, OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                     init_weights=False), name)
        with torch.no_grad():
            for _, m in adapter_layers(model, name):
                m.oft_R[name].copy_(0.2 * torch.randn(m.oft_R[name].shape, generator=torch.Generator().manual_seed(seed)))
    set_active_adapters(model, ["a"])
    a_only = evaluate(model, "llama")
    set_active_adapters(model, ["lora", "a", "b"])
    both = evaluate(model, "llama")
    assert (both - lora_only).abs().max() > 1e-3 and (both - a_only).abs().max() > 1e-3
    merge_adapters(model, ["a", "b"])
    assert (evaluate(model, "llama") - both).abs().max().item() <= 1e-5
    unmerge_adapters(model)
    assert (evaluate(model, "llama") - both).abs().max().item() <= 1e-5
    ids = batch("llama", 1)["input_ids"]
    set_active_adapters(model, ["lora"])
    with torch.no_grad(), route_adapters(model, ["a", "lora"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[1], lora_only[1], atol=1e-5, rtol=0)
    set_active_adapters(model, ["a"])
    torch.testing.assert_close(routed[0], evaluate(model, "llama")[0], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="already carries a lora adapter"):
        add_adapter(model, OFTConfig(target_modules=["k_proj"]), "x")
    delete_adapter(model, "a")
    delete_adapter(model, "b")
    set_active_adapters(model, ["lora"])
    assert (evaluate(model, "llama") - lora_only).abs().max().item() <= 1e-6


def test_module_dropout_drops_blocks_only_while_training():
    model = add_adapter(build("llama"), OFTConfig(oft_block_size=8, module_dropout=0.5, target_modules=["q_proj"],
                                                  init_weights=False))
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    blocks = layer.rotation("default", dropout=True)
    kept = [not torch.equal(b, torch.eye(8)) for b in blocks]
    assert sum(kept) == 4  # int(0.5 * 8) of the 8 blocks are identity
    assert torch.equal(layer.rotation("default"), layer.rotation("default"))


@pytest.mark.parametrize("kw, match", [
    (dict(r=4), "set exactly one of r and oft_block_size"),
    (dict(r=0, oft_block_size=0), "set exactly one of r and oft_block_size"),
    (dict(oft_block_size=-2), "oft_block_size must be an integer >= 0"),
    (dict(module_dropout=1.0), "module_dropout must be a number in \\[0, 1\\)"),
    (dict(bias="lora_only"), "bias must be one of \\['none', 'all', 'oft_only'\\]"),
    (dict(coft="yes"), "coft must be true or false"),
    (dict(eps=0), "eps must be a positive number"),
    (dict(num_cayley_neumann_terms=0), "num_cayley_neumann_terms must be an integer >= 1"),
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform cannot be combined"),
])
def test_oft_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        OFTConfig(**kw)


def test_oft_refusals_change_nothing(tmp_path):
    gpt2 = build("gpt2")
    with pytest.raises(ConfigError, match="is a Conv1D, which OFT does not support yet"):
        add_adapter(gpt2, OFTConfig(target_modules=["c_attn"]))
    assert list_adapters(gpt2) == {}
    ours = add_adapter(build("llama"), OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    save_adapter(ours, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "oft_block_size": 16}))  # the file's blocks are 8 wide
    model = build("llama")
    with pytest.raises(ModelError, match="oft_R.weight has shape \\(8, 28\\) but the model expects \\(4, 120\\)"):
        load_adapter(model, tmp_path / "a")
    assert list_adapters(model) == {}
    cfg_file.write_text(json.dumps({k: v for k, v in raw.items() if k != "oft_block_size"}))
    with pytest.raises(ModelError, match="written by peft < 0.14"):
        load_adapter(build("llama"), tmp_path / "a")


def test_oft_on_quantized_base():
    """QLoRA-style OFT: rotations train over frozen 4-bit codes; merging is refused until the base
    is dequantized, after which the same adapters run on plain Linears (same outputs) and merge."""
    from tuneforge import dequantize_model, quantize_model

    model = quantize_model(build("llama"), compute_dtype="float32")
    add_adapter(model, OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False))
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"OFTQuantLinear"}
    train(model, "llama", steps=1)
    quantized = evaluate(model, "llama")
    with pytest.raises(ConfigError, match="cannot merge into .*q_proj: its base weight is quantized"):
        merge_adapters(model)
    dequantize_model(model)
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"OFTLinear"}
    assert (evaluate(model, "llama") - quantized).abs().max().item() <= 1e-4
    merge_adapters(model)
    assert (evaluate(model, "llama") - quantized).abs().max().item() <= 1e-4


def test_oft_config_is_exported():
    assert tuneforge.OFTConfig is OFTConfig
