"""MAM adapters (prefix tuning + a scaled parallel bottleneck adapter, one adapter) on tiny Llama
(grouped-query attention), Qwen2 and GPT-2 (Conv1D). peft has no MAM method, so the oracle is the
two parts applied together: the same base with a PrefixTuningConfig adapter and a parallel
BottleneckConfig adapter holding the same tensors, both active (each part is checked against peft /
hand maths in test_prefix.py / test_bottleneck.py). Checked: outputs and gradients equal the pair's;
at init the adapter adds nothing; save -> load (peft_type MAM, peft's layout) also after
training; merge is refused with the reason; delete leaves the base model; bad configs refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_matrix import batch, build, evaluate, loss, train

from tuneforge.adapters import (
    BottleneckConfig,
    MamConfig,
    PrefixTuningConfig,
    add_adapter,
    delete_adapter,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.mam import WHY
from tuneforge.adapters.virtual_tokens import HOLDER, holder
from tuneforge.errors import ConfigError

KINDS = ["llama", "qwen2", "gpt2"]
SETTINGS = dict(num_virtual_tokens=3, adapter_size=6, adapter_act="gelu", adapter_scaling=4.0)


def mam(kind: str, **kw) -> torch.nn.Module:
    cfg = MamConfig(**{**SETTINGS, "init_weights": None, "init_bottleneck_weights": False, **kw})
    return add_adapter(build(kind), cfg)


def pair(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    """The base with a prefix adapter 'p' and a parallel bottleneck adapter 'b' holding `model`'s MAM
    tensors, both active."""
    ref = build(kind)
    add_adapter(ref, PrefixTuningConfig(num_virtual_tokens=3), "p")
    add_adapter(ref, BottleneckConfig(adapter_type="parallel", adapter_size=6, adapter_act="gelu",
                                      adapter_scaling=4.0), "b")
    with torch.no_grad():
        holder(ref).encoders["p"].embedding.weight.copy_(holder(model).encoders["default"].embedding.weight)
        paths = []
        for path, layer in adapter_layers(ref, "b"):
            layer.bottleneck["b"].load_state_dict(model.get_submodule(path).bottleneck["default"].state_dict())
            paths.append(path)
    assert paths == [p for p, _ in adapter_layers(model, "default") if p != HOLDER]
    set_active_adapters(ref, ["p", "b"])
    return ref


def grads(model: torch.nn.Module, kind: str) -> list[torch.Tensor]:
    model.zero_grad()
    loss(model, kind, batch(kind, 3)).backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", KINDS)
def test_mam_equals_prefix_plus_parallel_adapter(kind):
    model = mam(kind)
    ref = pair(kind, model)
    torch.testing.assert_close(evaluate(model, kind), evaluate(ref, kind), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(evaluate(model, kind), evaluate(build(kind), kind), atol=1e-3)
    # trainable tensors in the same order: the prefix, then each adapter's down / up weight and bias
    ours, theirs = grads(model, kind), grads(ref, kind)
    assert len(ours) == len(theirs) == 1 + 4 * len(list(adapter_layers(ref, "b")))
    for a, b in zip(ours, theirs):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mam_starts_as_the_base_and_round_trips(tmp_path, kind):
    model = add_adapter(build(kind), MamConfig(**SETTINGS))
    # at init the adapter adds nothing (zero up-projection): the model is a zero prefix's
    zero_prefix = add_adapter(build(kind), PrefixTuningConfig(num_virtual_tokens=3, init_weights="zero"))
    torch.testing.assert_close(evaluate(model, kind), evaluate(zero_prefix, kind))
    train(model, kind)
    want = evaluate(model, kind)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MAM" and config["adapter_scaling"] == 4.0 and config["num_virtual_tokens"] == 3
    back = load_adapter(build(kind), tmp_path, is_trainable=True)
    torch.testing.assert_close(evaluate(back, kind), want)
    with pytest.raises(ConfigError, match="cannot merge"):
        merge_adapters(model)
    delete_adapter(model, "default")
    assert holder(model) is None and not list(adapter_layers(model))
    torch.testing.assert_close(evaluate(model, kind), evaluate(build(kind), kind))


def test_mam_file_layout(tmp_path):
    from safetensors.torch import load_file

    save_adapter(mam("llama"), tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[-1] == "prompt_embeddings"
    assert keys[:4] == [f"base_model.model.model.layers.0.mlp.adapter_{p}" for p in
                        ("down.bias", "down.weight", "up.bias", "up.weight")]
    assert len(keys) == 1 + 4 * 2


def test_mam_refusals():
    with pytest.raises(ConfigError, match="adapter_size must be a positive whole number"):
        MamConfig(adapter_size=0)
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer"):
        MamConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="modules_to_save is not supported"):
        MamConfig(modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="decoder-only language model|feed-forward module"):
        add_adapter(build("bert"), MamConfig())
    assert WHY.startswith("a MAM adapter adds key/value prefixes")


@pytest.mark.parametrize("method, want", [("mam", 4.0), ("bottleneck", 1.0), ("unipelt", 1.0)])
def test_yaml_adapter_scaling_left_empty_takes_the_methods_default(method, want):
    from tuneforge.adapters import method_named
    from tuneforge.config import load_config

    finetune = load_config(None, {"finetuning_type": method}).finetune
    assert finetune.adapter_scaling is None
    assert method_named(method).from_finetune_args(finetune).adapter_scaling == want
    finetune = load_config(None, {"finetuning_type": method, "adapter_scaling": 2}).finetune
    assert method_named(method).from_finetune_args(finetune).adapter_scaling == 2.0
