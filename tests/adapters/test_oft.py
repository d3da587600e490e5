"""OFT through the method seams, checked against peft four ways (as test_matrix.py does for LoRA):
tiny Llama (with its embedding), Qwen2 (q/k/v biases) and BERT (classifier in modules_to_save), in three configurations
(block size + Neumann series; rank + exact Cayley with peft's fit of a rank that does not divide
in_features; one shared block + COFT + trained biases).
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout);
2. tuneforge trains and saves -> peft loads -> same outputs;
3. peft trains and saves -> tuneforge loads -> same outputs;
4. merge == unmerged, unmerge restores the base weights, disable == base model.
GPT-2's Conv1D has no OFT layer in peft, so tuneforge refuses it (in one line) as well.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import OFTConfig as PeftOFTConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from test_matrix import assert_peft_file_loads, assert_same_as_peft, batch, build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    LoraConfig,
    OFTConfig,
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
from tuneforge.adapters.oft import nearest_divisor
from tuneforge.adapters.orthogonal import cayley, cayley_neumann, skew_from_upper
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "bert": ["query", "value", "output.dense"],
}
VARIANTS = {
    "block": dict(oft_block_size=8),
    "rank-exact": dict(r=5, oft_block_size=0, use_cayley_neumann=False),  # r=5 fits to 4 (peft's rule)
    "share-coft-bias": dict(oft_block_size=16, block_share=True, coft=True, eps=0.5, bias="oft_only"),
}
CASES = [(k, v) for k in TARGETS for v in VARIANTS]


def config(kind: str, variant: str) -> dict:
    kw = dict(VARIANTS[variant], target_modules=list(TARGETS[kind]))
    if kind == "bert":
        kw["modules_to_save"] = ["classifier"]
    return kw


def pair(kind: str, kw: dict):
    """(ours, peft) with identical base weights and identical random rotations."""
    ours = add_adapter(build(kind), OFTConfig(**kw))
    theirs = get_peft_model(build(kind), PeftOFTConfig(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


@pytest.mark.filterwarnings("ignore:Invalid `r`")  # peft's own warning for r=5
@pytest.mark.parametrize("kind,variant", CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_oft_matches_peft(tmp_path, kind, variant):
    kw = config(kind, variant)

    # 1. same weights: same outputs and gradients
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, theirs = pair(kind, kw)
    assert any("does not divide in_features=64; using r=4" in str(w.message) for w in caught) == (
        variant == "rank-exact")
    assert {n for n, _ in adapter_layers(ours)} == {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "oft_R")
    }
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours, theirs, kind, base)
    assert all(g.abs().max() > 0 for k, g in g_ours.items() if k.endswith("_R.weight"))
    assert any(k.endswith("embed_tokens.oft_embedding_R.weight") for k in g_ours) == (kind == "llama")
    assert any(k.endswith(".base_layer.bias") for k in g_ours) == (variant == "share-coft-bias" and kind != "llama")

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), OFTConfig(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "OFT" and written["target_modules"] == TARGETS[kind]
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(build(kind), PeftOFTConfig(**kw))
    assert_peft_file_loads(theirs, kind, OFTConfig, tmp_path)

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "oft_" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-5, rtol=1e-5, msg=k)
    if variant != "share-coft-bias":  # trained biases stay trained when the adapter is off (as in peft)
        with disable_adapters(ours):
            assert (evaluate(ours, kind) - base).abs().max().item() <= 1e-6
    assert (evaluate(ours, kind) - trained).abs().max().item() <= 1e-5
    merged = evaluate(unload(ours, merge=True), kind)
    assert (merged - trained).abs().max().item() <= TOL


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
