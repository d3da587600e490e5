"""LoRA variants as objects (tuneforge/adapters/variants.py): the built-in ones are picked per adapter
from its LoraConfig, and a variant registered from outside runs through every hook without any
change to lora.py. The peft oracle tests (test_matrix, test_dora, test_pissa_olora, ...) prove the
built-in variants compute what they did before.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tuneforge.adapters import (
    LoraConfig,
    LoraVariant,
    add_adapter,
    combine_adapters,
    delete_adapter,
    list_adapters,
    merge_adapters,
    register_variant,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge_adapters,
    variants,
)
from tuneforge.adapters.lora import LoraLayer
from tuneforge.errors import ConfigError


@dataclass
class GatedConfig(LoraConfig):
    """A LoraConfig with one more field, read only by the test variant."""

    gate: float | None = None


class Gated(LoraVariant):
    """Test-only variant: a trained scalar gate g per adapter, `y = base(x) + g * s * B A x`."""

    key, kind = "gated", "forward"
    describe = "gated"
    owns_forward = True
    param_dicts = ("lora_gate",)

    def __init__(self, gate: float) -> None:
        self.gate = gate

    @classmethod
    def select(cls, cfg):
        gate = getattr(cfg, "gate", None)
        return None if gate is None else cls(gate)

    def check(self, layer_cls, module, path):
        if isinstance(module, nn.Embedding):
            raise ConfigError(f"the gated variant needs a Linear layer, {path} is an Embedding")

    def after_init(self, layer, name):
        layer.lora_gate[name] = nn.Parameter(torch.tensor(float(self.gate)))

    def delta(self, layer, name, delta):
        return delta * layer.lora_gate[name].detach().float()

    def extra_tensors(self, layer, name):
        return {"lora_gate": layer.lora_gate[name]}

    def add_adapters(self, layer, x, out, names):
        for n in names:
            t = (x.to(layer.lora_A[n].dtype) @ layer.lora_A[n].t()) @ layer.lora_B[n].t()
            g = layer.lora_gate.get(n, 1.0)
            out = out + (g * layer.lora_scaling[n] * t).to(out.dtype)
        return out


class Twin(Gated):
    key = "twin"  # a second forward-owning variant picked by the same config field


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(variants, "_VARIANTS", list(variants._VARIANTS))
    return variants


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Embedding(7, 3))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))


def _run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net[2](net[1](net[0](x)))


def _keys(layer, name="default") -> list[str]:
    return [v.key for v in layer.lora_variants[name]]


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        ({}, ["random_init"]),
        ({"use_rslora": True}, ["rslora", "random_init"]),
        ({"use_dora": True, "init_lora_weights": "gaussian"}, ["dora", "random_init"]),
        ({"init_lora_weights": "olora", "use_rslora": True}, ["rslora", "weight_init"]),
        ({"init_lora_weights": "pissa_niter_2", "use_dora": True}, ["dora", "weight_init"]),
    ],
)
def test_builtin_variants_are_picked_once_per_adapter(options, keys):
    net = _net()
    add_adapter(net, LoraConfig(r=2, target_modules=["0", "2"], **options))
    add_adapter(net, LoraConfig(r=3, target_modules=["0"]), name="plain")
    assert _keys(net[0]) == keys and _keys(net[2]) == keys
    assert _keys(net[0], "plain") == ["random_init"]
    r, alpha = 2, 8
    assert net[0].lora_scaling["default"] == pytest.approx(alpha / r**0.5 if "rslora" in keys else alpha / r)
    assert net[0].lora_scaling["plain"] == pytest.approx(8 / 3)
    assert ("lora_magnitude_vector" in net[0].peft_tensors("default")) == ("dora" in keys)


def test_registered_variant_runs_through_every_hook(registry):
    net = _net()
    x = _x()
    base = _run(net, x).detach()
    add_adapter(net, LoraConfig(r=2, target_modules=["0"]), name="before")  # made before registering
    register_variant(Gated)
    cfg = GatedConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False, gate=0.5)
    add_adapter(net, cfg, name="g")
    layer = net[0]
    assert _keys(layer, "g") == ["gated", "random_init"] and _keys(layer, "before") == ["random_init"]
    assert "lora_gate" in layer.param_dicts and "gated" in repr(layer)
    assert "lora_gate" in layer.peft_tensors("g") and "lora_gate" not in layer.peft_tensors("before")

    # forward: the variant's maths, by hand
    set_active_adapters(net, "g")
    h = x
    for m in (net[0], net[1], net[2]):
        if isinstance(m, LoraLayer):
            A, B, s = m.lora_A["g"], m.lora_B["g"], m.lora_scaling["g"]
            h = nn.functional.linear(h, m.weight, m.bias) + 0.5 * s * (h @ A.t() @ B.t())
        else:
            h = m(h)
    got = _run(net, x)
    torch.testing.assert_close(got, h)
    assert not torch.allclose(got, base)

    # the gate is an adapter parameter: trainable, and it gets a gradient
    gates = [n for n, p in net.named_parameters() if "lora_gate" in n and p.requires_grad]
    assert gates == ["0.lora_gate.g", "2.lora_gate.g"]
    assert trainable_parameters(net)[0] == sum(p.numel() for p in layer.adapter_parameters("g").values()) + sum(
        p.numel() for p in net[2].adapter_parameters("g").values()
    )
    got.square().sum().backward()
    assert layer.lora_gate["g"].grad is not None and layer.lora_gate["g"].grad.abs() > 0

    # merging adds the variant's delta; unmerging gives the weight back
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_gate["g"].fill_(-1.5)
        want = _run(net, x)
        merge_adapters(net, ["g"])
        torch.testing.assert_close(_run(net, x), want, rtol=1e-5, atol=1e-5)
        unmerge_adapters(net)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-6)

    delete_adapter(net, "g")
    assert "g" not in layer.lora_gate and "g" not in layer.lora_variants
    unload(net)
    assert type(net[0]) is nn.Linear and "lora_gate" not in dict(net[0].named_children())
    torch.testing.assert_close(_run(net, x), base)


def test_forward_variants_of_different_adapters_run_in_order(registry):
    """A gated adapter and a DoRA adapter active together: each is applied in turn (DoRA rescales
    what came before it), which is exactly what merging both computes."""
    register_variant(Gated)
    net = _net(3)
    x = _x(4)
    add_adapter(net, GatedConfig(r=2, target_modules=["0"], init_lora_weights=False, gate=0.7), name="g")
    add_adapter(net, LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False), name="d")
    with torch.no_grad():
        net[0].lora_magnitude_vector["d"].mul_(1.3)  # f != 1
    set_active_adapters(net, ["g", "d"])
    both = _run(net, x).detach()
    set_active_adapters(net, ["g"])
    assert not torch.allclose(_run(net, x), both)
    set_active_adapters(net, ["g", "d"])
    merge_adapters(net, ["g", "d"])
    torch.testing.assert_close(_run(net, x).detach(), both, rtol=1e-5, atol=1e-5)


def test_variant_check_refuses_before_any_change(registry):
    register_variant(Gated)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="the gated variant needs a Linear layer, 3 is an Embedding"):
        add_adapter(net, GatedConfig(r=2, target_modules=["0", "3"], gate=1.0))
    assert not any(isinstance(m, LoraLayer) for m in net.modules()) and list_adapters(net) == {}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_two_forward_variants_on_one_adapter_are_refused(registry):
    register_variant(Gated)
    register_variant(Twin)
    net = _net()
    with pytest.raises(ConfigError, match=r"LoRA variants \['gated', 'twin'\] each change the adapter's forward"):
        add_adapter(net, GatedConfig(r=2, target_modules=["0"], gate=1.0))
    assert list_adapters(net) == {}


def test_combine_asks_the_variants(registry):
    """combine_adapters refuses sources whose variant it cannot combine (the variant says why);
    rsLoRA sources combine (their scaling is folded into A and B)."""
    register_variant(Gated)
    net = _net()
    add_adapter(net, GatedConfig(r=2, target_modules=["0"], gate=1.0), name="a")
    add_adapter(net, LoraConfig(r=2, target_modules=["0"], use_rslora=True), name="b")
    add_adapter(net, LoraConfig(r=2, target_modules=["0"], use_dora=True), name="c")
    for sources, why in (
        (["b", "a"], r"adapters \['a'\] use the LoRA variant 'gated', which combine_adapters cannot combine"),
        (["c", "a"], r"adapters \['c'\] use DoRA, whose magnitude vectors have no weighted combination"),
    ):
        with pytest.raises(ConfigError, match=why):
            combine_adapters(net, sources, [0.5, 0.5], name="ab")
    assert sorted(list_adapters(net)) == ["a", "b", "c"]
    combine_adapters(net, ["b"], [2.0], name="b2")
    assert _keys(net[0], "b2") == ["random_init"]


def test_loftq_becomes_the_adapters_init_object():
    """apply_loftq swaps the adapter's init object for LoftQ's and restarts its other variants on
    the quantized base (DoRA's magnitude: ||dequant(Q) + s B A|| per row, still trainable)."""
    from tuneforge.adapters.loftq import LoftqInit, apply_loftq
    from tuneforge.quant import QuantizationConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    add_adapter(net, LoraConfig(r=2, target_modules=["0"], use_dora=True, use_rslora=True))
    apply_loftq(net, "default", QuantizationConfig(bits=4, compute_dtype="float32"), 1)
    layer = net[0]
    assert layer.quantized_base and _keys(layer) == ["loftq", "dora", "rslora"]
    assert isinstance(layer.lora_variants["default"][0], LoftqInit)
    s = layer.lora_scaling["default"]
    want = (layer.dequantize(torch.float32) + s * layer.lora_B["default"] @ layer.lora_A["default"]).norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].detach(), want, atol=1e-5, rtol=1e-5)
    assert layer.lora_magnitude_vector["default"].requires_grad


def test_register_variant_rejects_what_is_not_a_variant(registry):
    class NoKey(LoraVariant):
        pass

    for bad in (NoKey, object, Gated(1.0)):
        with pytest.raises(TypeError, match="must be a LoraVariant subclass with a key"):
            register_variant(bad)
    register_variant(Gated)
    register_variant(Gated)  # the same key again replaces it
    assert [v.key for v in variants.registered_variants()].count("gated") == 1
    variants.unregister_variant("gated")
    assert "gated" not in [v.key for v in variants.registered_variants()]
