"""Bottleneck adapters (Houlsby / Pfeiffer / parallel) against hand maths, on tiny Llama, Qwen2,
GPT-2 (Conv1D) and BERT (classifier in modules_to_save). peft has no bottleneck method, so the
oracle is a reference written here: the base model with forward hooks that add
`s * (f(h W_down^T + b_down) W_up^T + b_up)` to the adapted modules' outputs, computed from the
tensors of the saved file. Checked:
1. at init (zero up-projection) the output is the base model's, exactly;
2. with random tensors, outputs and gradients equal the reference's (autograd through the hooks);
3. save -> load round trip (peft's layout, peft_type BOTTLENECK), also after training;
4. two adapters switch, add up, route per row and delete; merge is refused with one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_matrix import batch, build, evaluate, loss, train

import tuneforge
from tuneforge.adapters import (
    BottleneckConfig,
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
    trainable_parameters,
    unload,
)
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.peft_format import PREFIX, adapter_state_dict
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5
ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "tanh": torch.tanh}
# BERT's feed-forward block is two modules: its parallel case names a module itself
CASES = [(k, t, {}) for k in ("llama", "qwen2", "gpt2") for t in ("houlsby", "pfeiffer", "parallel")] + [
    ("bert", "houlsby", {}), ("bert", "pfeiffer", {}), ("bert", "parallel", {"target_modules": ["intermediate"]}),
]
IDS = [f"{k}-{t}" for k, t, _ in CASES]
SITES = {  # the modules each adapter_type adapts by default (first layer)
    "llama": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"], "parallel": ["mlp"]},
    "gpt2": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"]},
    "bert": {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": ["output.dense"],
             "parallel": ["intermediate"]},
}


def make(kind, adapter_type, extra, act="relu", scaling=1.0, init=True, name="default", model=None):
    kw = dict(adapter_type=adapter_type, adapter_size=6, adapter_act=act, adapter_scaling=scaling,
              init_bottleneck_weights=init, **extra)
    if kind == "bert":
        kw["modules_to_save"] = ["classifier"]
    return add_adapter(build(kind) if model is None else model, BottleneckConfig(**kw), name)


def reference(kind: str, tensors: dict[str, torch.Tensor], cfg: BottleneckConfig, model=None):
    """The base model (or `model`) with hooks adding each adapter by hand; `tensors` in the file's
    layout (leaves). Returns (model, adapted module names)."""
    model = build(kind) if model is None else model
    f, s = ACT[cfg.adapter_act], cfg.adapter_scaling
    paths = sorted({k.removeprefix(PREFIX).rsplit(".adapter_", 1)[0] for k in tensors if ".adapter_" in k})

    def hook(path):
        t = {part: tensors[f"{PREFIX}{path}.adapter_{part}"] for part in ("down.weight", "down.bias", "up.weight", "up.bias")}

        def add(module, args, out):
            h = args[0] if cfg.adapter_type == "parallel" else out
            z = f(h @ t["down.weight"].T + t["down.bias"])
            return out + s * (z @ t["up.weight"].T + t["up.bias"])
        return add

    for path in paths:
        model.get_submodule(path).register_forward_hook(hook(path))
    for k, v in tensors.items():  # the classifier copy (modules_to_save) is the base's
        if ".adapter_" not in k:
            owner, _, param = k.removeprefix(PREFIX).rpartition(".")
            setattr(model.get_submodule(owner), param, torch.nn.Parameter(v.detach().clone()))
    return model, paths


@pytest.mark.parametrize("kind,adapter_type,extra", CASES, ids=IDS)
def test_bottleneck_matches_hand_maths(tmp_path, kind, adapter_type, extra):
    base = evaluate(build(kind), kind)
    # 1. the up-projection starts at zero: the base model exactly; only adapter tensors train
    model = make(kind, adapter_type, extra)
    assert torch.equal(evaluate(model, kind), base)
    paths = [p for p, _ in adapter_layers(model)]
    sites = SITES.get(kind, SITES["llama"])[adapter_type]
    first = sorted(p for p in paths if ".0." in p)
    assert [p.split(".0.", 1)[1] for p in first] == sorted(sites)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".bottleneck.default." in n or "modules_to_save" in n for n in names)

    # 2. random tensors (gelu, s=2): outputs and gradients equal the hand-written reference
    model = make(kind, adapter_type, extra, act="gelu", scaling=2.0, init=False)
    cfg = list_adapters(model)["default"]
    leaves = {k: v.clone().requires_grad_(True) for k, v in adapter_state_dict(model).items()}
    ref, ref_paths = reference(kind, leaves, cfg)
    assert ref_paths == sorted(paths)
    got = evaluate(model, kind)
    assert (got - base).abs().max() > 1e-3, "the adapter changes nothing"
    torch.testing.assert_close(got, evaluate(ref, kind), atol=TOL, rtol=0)
    b = batch(kind, 7)
    loss(model, kind, b).backward()
    loss(ref, kind, b).backward()
    mine = {f"{PREFIX}{p}.{k}": t.grad for p, m in adapter_layers(model) for k, t in m.peft_tensors("default").items()}
    for key, g in mine.items():
        assert g is not None and g.abs().max() > 0, key
        torch.testing.assert_close(g, leaves[key].grad, atol=1e-5, rtol=1e-4, msg=key)

    # 3. trained, saved, loaded back: the same outputs; the file is peft's layout
    model = make(kind, adapter_type, extra)
    train(model, kind)
    trained = evaluate(model, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(model, tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["peft_type"] == "BOTTLENECK" and written["adapter_type"] == adapter_type
    loaded = load_adapter(build(kind), tmp_path / "a")
    assert list_adapters(loaded)["default"] == list_adapters(model)["default"]
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL
    with disable_adapters(loaded):
        assert (evaluate(loaded, kind) - base).abs().max().item() <= 1e-6

    # 4. merge is refused with one line, and nothing changes
    with pytest.raises(ConfigError, match=r"cannot merge into .*: a bottleneck adapter puts a nonlinearity "
                       r"\(relu\) between its two projections, which no weight matrix can hold; nothing was merged"):
        merge_adapters(loaded)
    with pytest.raises(ConfigError, match="nonlinearity"):
        unload(loaded, merge=True)
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL
    plain = unload(loaded, merge=False)
    assert not any("bottleneck" in n for n, _ in plain.named_parameters())
    assert (evaluate(plain, kind) - base).abs().max().item() <= 1e-6


def test_two_adapters_switch_add_route_and_delete():
    """A sequential and a parallel adapter on one Llama: each alone, both (parallel on the block's
    input plus sequential after down_proj), per-row routing, and delete."""
    model = make("llama", "pfeiffer", {}, init=False, name="seq")
    make("llama", "parallel", {}, act="tanh", scaling=4.0, init=False, name="par", model=model)
    base = evaluate(build("llama"), "llama")
    set_active_adapters(model, "seq")
    seq = evaluate(model, "llama")
    set_active_adapters(model, "par")
    par = evaluate(model, "llama")
    assert min((seq - par).abs().max(), (seq - base).abs().max(), (par - base).abs().max()) > 1e-3
    # each alone equals the reference built from its own tensors
    for name, out in (("seq", seq), ("par", par)):
        ref, _ = reference("llama", adapter_state_dict(model, name), list_adapters(model)[name])
        torch.testing.assert_close(out, evaluate(ref, "llama"), atol=TOL, rtol=0)
    set_active_adapters(model, ["seq", "par"])
    both = evaluate(model, "llama")
    # both: down_proj's adapter runs inside mlp, whose output then gets the parallel adapter
    ref, _ = reference("llama", adapter_state_dict(model, "seq"), list_adapters(model)["seq"])
    ref, _ = reference("llama", adapter_state_dict(model, "par"), list_adapters(model)["par"], model=ref)
    torch.testing.assert_close(both, evaluate(ref, "llama"), atol=TOL, rtol=0)
    ids = batch("llama", 1)["input_ids"]
    with torch.no_grad(), route_adapters(model, ["par", "__base__"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], par[0], atol=TOL, rtol=0)
    torch.testing.assert_close(routed[1], base[1], atol=TOL, rtol=0)
    delete_adapter(model, "par")
    set_active_adapters(model, "seq")
    assert (evaluate(model, "llama") - seq).abs().max().item() <= 1e-6
    assert [type(m).__name__ for _, m in adapter_layers(model)] == ["BottleneckLinear"] * 2
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"  # stripped back to its class


def test_beside_lora_on_the_same_block():
    """A parallel adapter on `mlp` and a LoRA on its gate_proj: one model, both train."""
    model = add_adapter(build("llama"), LoraConfig(r=2, target_modules=["gate_proj"]), "lora")
    make("llama", "parallel", {}, name="bn", model=model)
    set_active_adapters(model, ["lora", "bn"])
    trainable, _ = trainable_parameters(model)
    assert trainable == 2 * (2 * 64 + 128 * 2) + 2 * (64 * 6 + 6 + 6 * 64 + 64)
    with pytest.raises(ConfigError, match="already carries a lora adapter"):
        make("llama", "houlsby", {"target_modules": ["gate_proj"]}, name="x", model=model)


def test_quantized_base(tmp_path):
    """On a 4-bit base the adapter wraps QuantLinear and trains; quantizing afterwards carries it."""
    from tuneforge.quant import dequantize_model, quantize_model

    model = quantize_model(build("llama"), bits=4)
    qbase = evaluate(model, "llama")
    make("llama", "houlsby", {}, model=model)
    assert torch.equal(evaluate(model, "llama"), qbase)
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "BottleneckQuantLinear"
    train(model, "llama")
    trained = evaluate(model, "llama")
    assert (trained - qbase).abs().max() > 1e-4
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    dequantize_model(model)  # the adapter moves onto the plain Linear, unchanged
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "BottleneckLinear"
    after = adapter_state_dict(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (evaluate(model, "llama") - trained).abs().max().item() <= 1e-2  # the base's rounding only


@pytest.mark.parametrize("kw, match", [
    (dict(adapter_type="serial"), "adapter_type must be one of houlsby, pfeiffer, parallel, got 'serial'"),
    (dict(adapter_act="swish"), "adapter_act must be one of relu, gelu, silu, tanh, got 'swish'"),
    (dict(adapter_size=0), "adapter_size must be a positive whole number, got 0"),
    (dict(adapter_scaling=float("nan")), "adapter_scaling must be a positive number"),
    (dict(adapter_scaling=0), r"adapter_scaling must be a positive number \(e.g. 1, or 4 for parallel\), got 0"),
    (dict(init_bottleneck_weights="yes"), "init_bottleneck_weights must be true or false"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        BottleneckConfig(**kw)


def test_refusals_change_nothing(tmp_path):
    model = build("bert")
    with pytest.raises(ConfigError, match="no single feed-forward module for a parallel adapter in model type 'bert'"):
        add_adapter(model, BottleneckConfig(adapter_type="parallel"))
    with pytest.raises(ConfigError, match=r"cannot tell the hidden size at .*LayerNorm"):
        add_adapter(model, BottleneckConfig(target_modules=["attention.output.LayerNorm"]))
    assert list_adapters(model) == {}
    llama = make("llama", "houlsby", {"target_modules": ["self_attn"]})
    with pytest.raises(ConfigError, match="takes and returns one tensor.*returns tuple"):
        evaluate(llama, "llama")
    ours = make("llama", "pfeiffer", {})
    save_adapter(ours, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "adapter_size": 8}))
    with pytest.raises(ModelError, match=r"adapter_down.bias has shape \(6,\) but the model expects "
                       r"\(8,\) \(model.layers.0.mlp.down_proj: adapter_size=8, sequential\)"):
        load_adapter(build("llama"), tmp_path / "a")
    cfg_file.write_text(json.dumps({**raw, "adapter_act": "elu"}))
    with pytest.raises(ModelError, match="adapter_act must be one of relu, gelu, silu, tanh, got 'elu'"):
        load_adapter(build("llama"), tmp_path / "a")


def test_bottleneck_config_is_exported():
    assert tuneforge.BottleneckConfig is BottleneckConfig
