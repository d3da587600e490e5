"""UniPELT (gated LoRA + gated prefix + gated bottleneck adapter, one adapter) on tiny Llama
(grouped-query attention), Qwen2 and GPT-2 (Conv1D). peft has no UniPELT, so the oracles are the
issue's: with every gate at 1 the adapter equals its three parts applied together (a LoRA, a
prefix-tuning and a sequential bottleneck adapter holding the same tensors, all active; each part is
checked against peft / hand maths in its own tests), with every gate at 0 it equals the base model.
Also: gradients reach every part and gate, save -> load (peft_type UNIPELT), routing rows of
different adapters in one batch, cached generation, eager == sdpa attention, a 4-bit base, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from adapter_testkit import make_model
from test_matrix import batch, build, evaluate, loss, train

from tuneforge.adapters import (
    BottleneckConfig,
    LoraConfig,
    PrefixTuningConfig,
    add_adapter,
    delete_adapter,
    load_adapter,
    merge_adapters,
    route_adapters,
    save_adapter,
    set_active_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.unipelt import UniPeltConfig
from tuneforge.adapters.unipelt_layers import WHY, GatedBlock, GatedLora, UniPeltQuantLinear
from tuneforge.adapters.virtual_tokens import holder
from tuneforge.errors import ConfigError

KINDS = ["llama", "qwen2", "gpt2"]
N = 3  # virtual tokens
SETTINGS = dict(r=4, lora_alpha=8, num_virtual_tokens=N, adapter_size=6, adapter_act="gelu", adapter_scaling=2.0)
QV = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def unipelt(kind: str, model=None, **kw) -> torch.nn.Module:
    """A UniPELT adapter whose parts all start non-zero (random B, up-projection and prefix)."""
    cfg = UniPeltConfig(**{**SETTINGS, "init_weights": None, "init_bottleneck_weights": False,
                           "init_lora_weights": False, **kw})
    torch.manual_seed(5)
    return add_adapter(model if model is not None else build(kind), cfg)


def set_gates(model, value: float) -> None:
    """Every gate of adapter 'default' to sigmoid(value): 1 (value 1e4) or 0 (value -1e4), exactly."""
    with torch.no_grad():
        for _, layer in adapter_layers(model, "default"):
            pairs = []
            if isinstance(layer, GatedLora):
                pairs.append((layer.lora_gate["default"], layer.lora_gate_bias["default"]))
            if isinstance(layer, GatedBlock):
                if "default" in layer.prefix_gate:
                    pairs.append((layer.prefix_gate["default"], layer.prefix_gate_bias["default"]))
                if "default" in layer.bottleneck:
                    g = layer.bottleneck["default"].adapter_gate
                    pairs.append((g.weight, g.bias))
            for w, b in pairs:
                w.zero_()
                b.fill_(value)


def three_parts(kind: str, model) -> torch.nn.Module:
    """The base with a LoRA 'l', a prefix 'p' and a sequential bottleneck adapter 'b' after each
    feed-forward block, holding `model`'s UniPELT tensors, all three active."""
    ref = build(kind)
    add_adapter(ref, LoraConfig(r=4, lora_alpha=8, target_modules=QV[kind]), "l")
    add_adapter(ref, PrefixTuningConfig(num_virtual_tokens=N), "p")
    add_adapter(ref, BottleneckConfig(adapter_type="houlsby", target_modules=["mlp"], adapter_size=6,
                                      adapter_act="gelu", adapter_scaling=2.0), "b")
    with torch.no_grad():
        holder(ref).encoders["p"].embedding.weight.copy_(holder(model).encoders["default"].embedding.weight)
        for path, layer in adapter_layers(ref, "l"):
            ours = model.get_submodule(path)
            layer.lora_A["l"].copy_(ours.lora_A["default"])
            layer.lora_B["l"].copy_(ours.lora_B["default"])
        for path, layer in adapter_layers(ref, "b"):
            state = {k: v for k, v in model.get_submodule(path).bottleneck["default"].state_dict().items()
                     if not k.startswith("adapter_gate")}
            layer.bottleneck["b"].load_state_dict(state)
    set_active_adapters(ref, ["l", "p", "b"])
    return ref


def grads(model, kind: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss(model, kind, batch(kind, 3)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_gates_at_one_equal_the_three_parts_together(kind):
    model = unipelt(kind)
    ref = three_parts(kind, model)
    assert not torch.allclose(evaluate(model, kind), evaluate(ref, kind), atol=1e-3)  # gates about 1/2
    set_gates(model, 1e4)
    torch.testing.assert_close(evaluate(model, kind), evaluate(ref, kind), rtol=1e-5, atol=1e-5)
    # the parts' gradients are the three methods' (the saturated gates get none)
    ours, theirs = grads(model, kind), grads(ref, kind)
    mine = {n: g for n, g in ours.items() if "gate" not in n}
    assert len(mine) == len(theirs)
    for (n, a), b in zip(mine.items(), theirs.values()):
        assert a.abs().sum() > 0, n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_gates_at_zero_equal_the_base_model(kind):
    model = unipelt(kind)
    set_gates(model, -1e4)
    ids = batch(kind, 1)["input_ids"]
    base = build(kind)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        # the prefix moves the real tokens to positions N.. (as peft's prefix tuning): the same for
        # rotary models; GPT-2's learned positions are compared at those positions
        pos = torch.arange(N, N + ids.shape[1])[None] if kind == "gpt2" else None
        want = base(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_every_part_and_gate_trains_and_round_trips(tmp_path, kind):
    model = add_adapter(build(kind), UniPeltConfig(**SETTINGS))
    g = grads(model, kind)  # at the start LoRA and the adapter add zero: their gates get no gradient yet
    assert all(g[n].abs().sum() > 0 for n in g if "prefix_gate" in n or "lora_B" in n or "adapter_up" in n)
    train(model, kind)
    g = grads(model, kind)
    assert len([n for n in g if "gate" in n]) == 2 * (3 if kind == "gpt2" else 4) * 2
    assert all(t.abs().sum() > 0 for t in g.values())
    model.zero_grad()
    want = evaluate(model, kind)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNIPELT" and config["target_modules"] == QV[kind] and config["r"] == 4
    assert config["adapter_modules"] == ["mlp"] and config["num_virtual_tokens"] == N
    back = load_adapter(build(kind), tmp_path, is_trainable=True)
    torch.testing.assert_close(evaluate(back, kind), want)
    with pytest.raises(ConfigError, match="cannot merge into .* a UniPELT adapter multiplies"):
        merge_adapters(model)
    delete_adapter(model, "default")
    assert holder(model) is None and not list(adapter_layers(model))
    torch.testing.assert_close(evaluate(model, kind), evaluate(build(kind), kind))


def test_file_layout(tmp_path):
    from safetensors.torch import load_file

    save_adapter(unipelt("llama"), tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    layer0 = [k.removeprefix("base_model.model.model.layers.0.") for k in keys if ".layers.0." in k]
    assert layer0 == [f"mlp.adapter_{p}" for p in ("down.bias", "down.weight", "gate.bias", "gate.weight",
                                                     "up.bias", "up.weight")] + \
        ["self_attn.prefix_gate.bias", "self_attn.prefix_gate.weight"] + \
        [f"self_attn.{m}.lora_{p}" for m in ("q_proj", "v_proj") for p in ("A.weight", "B.weight", "gate.bias",
                                                                            "gate.weight")]
    assert keys[-1] == "prompt_embeddings" and len(keys) == 1 + 2 * len(layer0)


def test_rows_of_other_adapters_in_one_batch_are_untouched():
    """route_adapters: a UniPELT row, a base row and a LoRA row in one batch each equal their own run
    (the prefix gate acts on the UniPELT row only)."""
    model = unipelt("llama", target_modules=["q_proj"])
    add_adapter(model, LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False), "lora")
    model.eval()
    ids = batch("llama", 1)["input_ids"][:1].repeat(3, 1)
    with torch.no_grad(), route_adapters(model, ["default", "__base__", "lora"]):
        mixed = model(input_ids=ids).logits
    alone = {}
    with torch.no_grad():
        for name in ("default", "lora"):
            set_active_adapters(model, name)
            alone[name] = model(input_ids=ids[:1]).logits
    base = build("llama")
    with torch.no_grad():
        alone["__base__"] = base(input_ids=ids[:1]).logits
    for row, name in enumerate(["default", "__base__", "lora"]):
        torch.testing.assert_close(mixed[row : row + 1], alone[name], rtol=1e-5, atol=1e-5, msg=name)


def test_cached_generation_equals_recomputing_each_step():
    model = unipelt("llama").eval()
    ids = batch("llama", 1)["input_ids"][:1]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        seq = ids
        for _ in range(6):  # no cache: the whole sequence each step
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert out.tolist() == seq.tolist()


def test_eager_attention_equals_sdpa():
    outs = []
    for impl in ("sdpa", "eager"):
        model = unipelt("llama", model=make_model("llama", attn_implementation=impl))
        ids = batch("llama", 1)["input_ids"]
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_on_a_4bit_base_equals_the_dequantized_model():
    from tuneforge.quant import dequantize_model, quantize_model

    model = make_model("llama")
    quantize_model(model, compute_dtype="float32", backend="native")
    ref = dequantize_model(copy.deepcopy(model))
    for m in (model, ref):
        unipelt("llama", model=m)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), UniPeltQuantLinear)
    ids = batch("llama", 1)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_refusals():
    with pytest.raises(ConfigError, match="r must be a positive whole number"):
        UniPeltConfig(r=0)
    with pytest.raises(ConfigError, match="adapter_size must be a positive whole number"):
        UniPeltConfig(adapter_size=0)
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer"):
        UniPeltConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="LoRA goes on Linear layers; target_modules matched model.layers.0.mlp"):
        add_adapter(build("llama"), UniPeltConfig(target_modules=["mlp"]))
    with pytest.raises(ConfigError, match="adapter goes after a block .* matched model.layers.0.mlp.down_proj"):
        add_adapter(build("llama"), UniPeltConfig(adapter_modules=["down_proj"]))
    with pytest.raises(ConfigError, match="decoder-only language model"):
        add_adapter(build("bert"), UniPeltConfig(target_modules=["query"], adapter_modules=["intermediate"]))
    assert WHY.startswith("a UniPELT adapter multiplies each part by a gate")


def test_the_gate_follows_the_prefix_in_a_left_padded_cache():
    """The continuous batcher left-pads a running row's cache when a longer row joins
    (infer/decode.join): the prefix then starts after the padding columns, and its gate must follow."""
    from tuneforge.adapters.virtual_tokens import virtual_mask
    from tuneforge.infer.decode import _left_pad

    model = unipelt("llama").eval()
    ids = batch("llama", 1)["input_ids"][:1]
    mask = torch.cat([virtual_mask(model, ["default"]), torch.ones_like(ids)], dim=1)  # over the whole cache
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt, pos = out.logits[:, -1:].argmax(-1), mask.sum(-1, keepdim=True)
        step = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        want = model(input_ids=nxt, attention_mask=step, past_key_values=copy.deepcopy(out.past_key_values),
                     position_ids=pos).logits
        cache = out.past_key_values
        for layer in cache.layers:
            layer.keys, layer.values = (_left_pad(t, t.shape[2] + 5) for t in (layer.keys, layer.values))
        padded = torch.cat([torch.zeros(1, 5, dtype=mask.dtype), step], dim=1)
        got = model(input_ids=nxt, attention_mask=padded, past_key_values=cache, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
