"""DoRA (use_dora=True): outputs, gradients, files and merges equal peft's; the norm stays cheap."""

import json

import pytest
import torch
from adapter_testkit import logits, make_model, peft_lora_modules, tokens, train_steps
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from tuneforge.adapters import (
    LoraConfig,
    LoraLayer,
    add_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    unload,
    unmerge_adapters,
)
from tuneforge.adapters import registry
from tuneforge.adapters.core import adapter_tensors, lora_layers, set_trainable
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]  # Conv1D layers, weight stored (in, out)


def _kw(kind, **kw):
    kw.setdefault("target_modules", "all-linear" if kind == "llama" else GPT2_TARGETS)
    kw.setdefault("init_lora_weights", False)
    return dict(use_dora=True, **kw)


def _copy_to_peft(ours, theirs, name="default"):
    theirs_layers = peft_lora_modules(theirs)
    with torch.no_grad():
        for path, layer in lora_layers(ours, name):
            t = theirs_layers[path]
            t.lora_A[name].weight.copy_(layer.lora_A[name])
            t.lora_B[name].weight.copy_(layer.lora_B[name])
            t.lora_magnitude_vector[name].weight.copy_(layer.lora_magnitude_vector[name])


def _pair(kind, seed=0, **kw):
    """(ours, peft) with identical weights; magnitudes moved off their start so f != 1."""
    kw = _kw(kind, **kw)
    ours = add_adapter(make_model(kind), LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            m = layer.lora_magnitude_vector["default"]
            m.mul_(0.7 + 0.6 * torch.rand(m.shape, generator=g))
    theirs = get_peft_model(make_model(kind), PeftLoraConfig(**kw))
    _copy_to_peft(ours, theirs)
    return ours, theirs


def _grad_error(ours, theirs):
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    g_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(g_ours) == len(g_theirs) > 0
    worst, seen = 0.0, set()
    for path, _ in lora_layers(ours):
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            mine = g_ours[f"{path}.{part}.default"]
            ref = g_theirs[f"base_model.model.{path}.{part}.default.weight"]
            worst = max(worst, (mine - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
            seen.add(part)
    assert seen == {"lora_A", "lora_B", "lora_magnitude_vector"}
    return worst


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_and_gradients_equal_peft(kind):
    ours, theirs = _pair(kind, r=4, lora_alpha=8)
    ids = tokens()
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert _grad_error(ours, theirs) <= TOL
    ours.eval(), theirs.eval()
    got = logits(ours, ids)
    assert (got - logits(theirs, ids)).abs().max().item() <= TOL
    assert (got - logits(make_model(kind), ids)).abs().max().item() > 1e-2  # DoRA did something


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dropout_in_training_equals_peft(kind):
    """peft recomputes the base product on the dropped-out input; with the same RNG state the masks agree."""
    ours, theirs = _pair(kind, r=4, lora_alpha=8, lora_dropout=0.3)
    ids = tokens()
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(1234)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=TOL)
    assert _grad_error(ours, theirs) <= TOL
    ours.eval(), theirs.eval()  # no dropout in eval
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rslora_dora_and_initial_magnitude_equal_peft(kind):
    kw = dict(r=8, lora_alpha=4, use_rslora=True, use_dora=True)
    kw["target_modules"] = "all-linear" if kind == "llama" else GPT2_TARGETS
    ours = add_adapter(make_model(kind), LoraConfig(**kw))  # default init: B = 0, m = ||W|| per row
    theirs = get_peft_model(make_model(kind), PeftLoraConfig(**kw))
    ref = peft_lora_modules(theirs)
    for path, layer in lora_layers(ours):
        m, m_ref = layer.lora_magnitude_vector["default"], ref[path].lora_magnitude_vector["default"].weight
        assert m.dtype == torch.float32 and m.shape == m_ref.shape
        assert (m - m_ref).abs().max().item() <= 1e-6 * m_ref.abs().max().item()
        assert layer.lora_scaling["default"] == pytest.approx(ref[path].scaling["default"])
    ids = tokens()
    assert (logits(ours, ids) - logits(make_model(kind), ids)).abs().max().item() <= TOL  # starts as a no-op

    ours, theirs = _pair(kind, **{k: v for k, v in kw.items() if k not in ("use_dora", "target_modules")})
    for model in (ours, theirs):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert _grad_error(ours, theirs) <= TOL
    ours.eval(), theirs.eval()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() <= TOL


def test_magnitude_is_trainable_exactly_when_the_adapter_is():
    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    tensors = adapter_tensors(model, "default")
    mags = [k for k in tensors if ".lora_magnitude_vector.default" in k]
    assert len(mags) == 4 and all(tensors[k].requires_grad for k in tensors)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(tensors)
    set_trainable(model, "default", False)
    assert not any(p.requires_grad for p in model.parameters())
    set_trainable(model, "default", True)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "plain")  # the DoRA one is now inactive
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".default"))
    layer = model.model.layers[0].self_attn.q_proj
    assert list(layer.lora_magnitude_vector.keys()) == ["default"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tuneforge_file_loads_in_peft(tmp_path, kind):
    model = add_adapter(make_model(kind), LoraConfig(**_kw(kind, r=4, lora_alpha=8, init_lora_weights=True)))
    train_steps(model, steps=3, opt="adamw")
    ids = tokens()
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(make_model(kind), ids), atol=1e-3)
    save_adapter(model, tmp_path / "a")

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    mags = [k for k in sd if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == len(list(lora_layers(model))) and all(sd[k].dtype == torch.float32 for k in mags)

    theirs = PeftModel.from_pretrained(make_model(kind), str(tmp_path / "a")).eval()
    assert (logits(theirs, ids) - ours).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_file_loads_in_tuneforge(tmp_path, kind):
    peft_model = get_peft_model(make_model(kind), PeftLoraConfig(**_kw(kind, r=4, lora_alpha=8)))
    train_steps(peft_model, steps=3, opt="adamw")
    ids = tokens()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "p"))

    model = load_adapter(make_model(kind), tmp_path / "p")
    assert list_adapters(model)["default"].use_dora is True
    assert (logits(model, ids) - expected).abs().max().item() <= TOL
    assert not any(p.requires_grad for p in model.parameters())

    model = load_adapter(make_model(kind), tmp_path / "p", is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_magnitude_vector.default" in n for n in trainable)
    save_adapter(model, tmp_path / "again")  # re-saving gives peft's file back
    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_file_missing_magnitudes_is_refused(tmp_path):
    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    save_adapter(model, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": False}))
    with pytest.raises(ModelError, match="lora_magnitude_vector"):  # DoRA tensors, but a plain LoRA config
        load_adapter(make_model("llama"), tmp_path / "a")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_disable_unload(kind):
    model, _ = _pair(kind, r=4, lora_alpha=8)
    ids = tokens()
    base_model = make_model(kind)
    base = logits(base_model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert merge_adapters(model) == ["default"]
    assert (logits(model, ids) - adapted).abs().max().item() <= TOL
    with disable_adapters(model):
        assert (logits(model, ids) - base).abs().max().item() <= TOL
    assert (logits(model, ids) - adapted).abs().max().item() <= TOL
    assert unmerge_adapters(model) == ["default"]
    after = model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= TOL
    with disable_adapters(model):
        assert (logits(model, ids) - base).abs().max().item() <= TOL
    plain = unload(model, merge=True)
    assert list(plain.state_dict()) == list(base_model.state_dict())
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert (logits(plain, ids) - adapted).abs().max().item() <= TOL


def test_merged_weight_is_peft_formula():
    model, theirs = _pair("gpt2", r=4, lora_alpha=8)
    layer = model.transformer.h[0].attn.c_attn
    W = layer.weight.detach().clone()  # (in, out)
    with torch.no_grad():
        delta = (layer.lora_B["default"] @ layer.lora_A["default"]).T * layer.lora_scaling["default"]
        f = layer.lora_magnitude_vector["default"] / torch.linalg.norm((W + delta).T, dim=1)
    merge_adapters(model)
    assert (layer.weight - f.view(1, -1) * (W + delta)).abs().max().item() <= TOL
    theirs.merge_adapter()
    ref = peft_lora_modules(theirs)["transformer.h.0.attn.c_attn"].base_layer.weight
    assert (layer.weight - ref).abs().max().item() <= TOL


def test_safe_merge_refuses_nan_magnitude():
    model, _ = _pair("llama", r=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_magnitude_vector["default"][3] = float("nan")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="NaN"):
        merge_adapters(model, safe_merge=True)
    state = model.state_dict()
    assert all(torch.equal(weights[k], v) or "magnitude" in k for k, v in state.items())
    assert not any(m.lora_merged for m in model.modules() if isinstance(m, LoraLayer))


def test_several_adapters_mixed_dora_and_lora_match_peft(tmp_path):
    """peft's rule with several adapters: each DoRA adapter rescales what the adapters before it added."""
    model = make_model("llama")
    specs = {
        "a": dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        "b": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
        "c": dict(r=2, lora_alpha=2, target_modules=["v_proj", "up_proj"], use_dora=True),
    }
    g = torch.Generator().manual_seed(3)
    for name, kw in specs.items():
        add_adapter(model, LoraConfig(init_lora_weights=False, **kw), name)
        with torch.no_grad():
            for _, layer in lora_layers(model, name):
                if name in layer.lora_magnitude_vector:
                    m = layer.lora_magnitude_vector[name]
                    m.mul_(0.7 + 0.6 * torch.rand(m.shape, generator=g))
        save_adapter(model, tmp_path / name, name=name)
    order = ["a", "b", "c"]
    set_active_adapters(model, order)
    ids = tokens()
    ours = logits(model, ids)
    theirs = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "a"), adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    theirs.base_model.set_adapter(order)
    assert (logits(theirs.eval(), ids) - ours).abs().max().item() <= TOL

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_adapters(model) == order
    assert (logits(model, ids) - ours).abs().max().item() <= TOL
    assert unmerge_adapters(model) == order
    after = model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= TOL

    # merging in two calls (a first, then b and c) gives the same weights and outputs
    merge_adapters(model, ["a"])
    assert (logits(model, ids) - ours).abs().max().item() <= TOL  # b and c run over the merged a
    merge_adapters(model, ["b", "c"])
    assert (logits(model, ids) - ours).abs().max().item() <= TOL
    unmerge_adapters(model)
    after = model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= TOL


def test_weight_norm_cache_follows_weight_changes():
    lin = nn.Sequential(nn.Linear(24, 40))
    add_adapter(lin, LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
    layer = lin[0]
    x = torch.randn(7, 24)

    def reference(x):
        with torch.no_grad():
            s = layer.lora_scaling["default"]
            full = layer.weight + s * layer.lora_B["default"] @ layer.lora_A["default"]
            f = layer.lora_magnitude_vector["default"] / torch.linalg.norm(full, dim=1)
            return f * (x @ full.T) + layer.bias

    assert (lin(x) - reference(x)).abs().max().item() <= TOL
    with torch.no_grad():
        layer.weight.mul_(1.5)  # in place: the cached ||W||^2 must not be reused
    assert (lin(x) - reference(x)).abs().max().item() <= TOL
    lin.to(torch.float64)  # new tensors
    x = x.double()
    assert (lin(x) - reference(x)).abs().max().item() <= TOL
    with torch.no_grad():
        layer.weight.add_(0.1)
    assert (lin(x) - reference(x)).abs().max().item() <= TOL


def test_bf16_base_and_autocast():
    lin = nn.Sequential(nn.Linear(48, 80))
    add_adapter(lin, LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        lin[0].lora_magnitude_vector["default"].mul_(1.3)
    x = torch.randn(5, 48)
    ref = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lin(x)
    assert (auto.float() - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()
    lin[0].weight.data = lin[0].weight.data.bfloat16()
    lin[0].bias.data = lin[0].bias.data.bfloat16()
    assert lin[0].lora_magnitude_vector["default"].dtype == torch.float32
    out = lin(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() <= 3e-2 * ref.abs().max().item()


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_forward_never_makes_an_out_by_in_tensor(dropout, layer_type):
    """The row norm of W + sBA is computed without forming that (out, in) matrix, in forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    out_f, in_f, n = 40, 24, 7

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if not func.is_view:  # views (e.g. weight.t()) allocate nothing
                for t in result if isinstance(result, (tuple, list)) else [result]:
                    if isinstance(t, torch.Tensor):
                        self.seen.append((str(func), tuple(t.shape)))
            return result

    if layer_type == "linear":
        net = nn.Sequential(nn.Linear(in_f, out_f))
    else:
        from transformers.pytorch_utils import Conv1D

        net = nn.Sequential(Conv1D(out_f, in_f))  # weight stored (in, out)
    cfg = LoraConfig(r=4, target_modules=["0"], use_dora=True, lora_dropout=dropout, init_lora_weights=False)
    add_adapter(net, cfg)
    net.train()
    x = torch.randn(n, in_f, requires_grad=True)
    with Shapes() as rec:
        net(x).square().sum().backward()
    big = [(op, s) for op, s in rec.seen if s in ((out_f, in_f), (in_f, out_f))]
    assert not big, big
    assert any(s == (n, out_f) for _, s in rec.seen)  # the recorder did see the layer's ops
    layer = net[0]
    assert layer.weight.grad is None
    assert all(p.grad is not None for p in adapter_tensors(net, "default").values())


def test_unsupported_layer_type_is_refused_before_anything_changes(monkeypatch):
    class Affine(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n, n))
            self.bias = None

        def forward(self, x):
            return x @ self.weight.T

    class LoraAffine(LoraLayer, Affine):  # a LoRA layer type without DoRA maths
        pass

    monkeypatch.setattr(registry, "_LAYERS", list(registry._LAYERS))
    registry.register_layer(Affine, LoraAffine)
    net = nn.Sequential(nn.Linear(8, 8), Affine(8))
    with pytest.raises(ConfigError, match=r"use_dora is not supported for Affine layers yet.*\b1\b"):
        add_adapter(net, LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    assert not any(isinstance(m, LoraLayer) for m in net.modules()) and list_adapters(net) == {}
    add_adapter(net, LoraConfig(r=2, target_modules=["0", "1"]))  # plain LoRA works on it
    assert isinstance(net[1], LoraAffine) and len(net[1].lora_magnitude_vector) == 0
    with pytest.raises(ConfigError, match="use_dora is not supported for Affine"):
        net[1].add_lora("x", 2, 2, 0.0, False, True, use_dora=True)
    assert "x" not in net[1].lora_A


def test_gradient_checkpointing_and_deepcopy():
    import copy

    model, _ = _pair("llama", r=4, lora_dropout=0.0)
    ids = tokens()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(input_ids=ids, labels=ids).loss.backward()
    ckpt = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert plain.keys() == ckpt.keys() and any("magnitude" in n for n in plain)
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)
    model.activation_checkpointing_disable()
    model.eval()
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, ids), logits(model, ids))
