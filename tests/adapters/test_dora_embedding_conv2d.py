"""DoRA on nn.Embedding and nn.Conv2d, with peft as the oracle: outputs, gradients, files, merges.

peft's layouts: an embedding's magnitude has one value per embedding dimension (the norm runs over
the vocabulary), a conv's magnitude is (1, out, 1, 1) (the norm runs over in * kh * kw).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from adapter_testkit import VOCAB, make_model
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from tuneforge.adapters import (
    LoraConfig,
    LoraConv2d,
    LoraEmbedding,
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
from tuneforge.adapters.core import adapter_tensors, lora_layers
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5


class SmallCNN(nn.Module):
    """Padded 3x3 conv, strided 3x3 conv, 1x1 conv, linear head."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups)
        self.mix = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(self.mix(h).flatten(1))


TARGETS = {"llama": ["embed_tokens", "q_proj"], "cnn": ["conv1", "conv2", "mix", "fc"]}
PROBE = {"llama": "model.embed_tokens", "cnn": "conv2"}


def build(kind: str, **kw) -> nn.Module:
    if kind == "cnn":
        torch.manual_seed(0)
        return SmallCNN(**kw).eval()
    return make_model("llama", **kw)


def batch(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return torch.randn(3, 3, 8, 8, generator=g)
    return torch.randint(0, VOCAB, (2, 9), generator=g)


def run(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    return model(x) if kind == "cnn" else model(input_ids=x).logits


def evaluate(model: nn.Module, kind: str, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return run(model, kind, batch(kind, seed))


def loss(model: nn.Module, kind: str, seed: int) -> torch.Tensor:
    x = batch(kind, seed)
    return run(model, kind, x).square().mean() if kind == "cnn" else model(input_ids=x, labels=x).loss


def train(model: nn.Module, kind: str, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        loss(model, kind, 100 + step).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def perturb(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    """B != 0 and magnitudes away from ||W + sBA|| (so that f != 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_tensors(model, name).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


def pair(kind: str, **kw):
    """(ours, peft) with identical base weights and identical adapter weights (copied through peft's loader)."""
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, init_lora_weights=False, **kw)
    ours = add_adapter(build(kind), LoraConfig(**kw))
    perturb(ours)
    theirs = get_peft_model(build(kind), PeftLoraConfig(**kw))
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


def grads_in_file_layout(ours, theirs) -> tuple[dict, dict]:
    mine = {f"{path}.{k}": t.grad for path, m in lora_layers(ours) for k, t in m.peft_tensors("default").items()}
    ref = {}
    for n, p in theirs.named_parameters():
        if p.requires_grad:
            key = n.removeprefix("base_model.model.").replace(".default", "")
            ref[key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = p.grad
    return mine, ref


def peft_layer(theirs, path: str):
    return theirs.base_model.model.get_submodule(path)


# ---- same weights: same outputs and gradients --------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_forward_and_gradients_equal_peft(kind):
    ours, theirs = pair(kind)
    layer = ours.get_submodule(PROBE[kind])
    assert isinstance(layer, (LoraEmbedding, LoraConv2d)) and "default" in layer.lora_magnitude_vector
    got = evaluate(ours, kind)
    assert (got - evaluate(build(kind), kind)).abs().max() > 1e-2
    assert (got - evaluate(theirs, kind)).abs().max().item() <= TOL

    for model in (ours, theirs):
        model.train()
        loss(model, kind, 7).backward()
    mine, ref = grads_in_file_layout(ours, theirs)
    assert sorted(mine) == sorted(ref)
    mags = [k for k in ref if k.endswith("lora_magnitude_vector")]
    assert f"{PROBE[kind]}.lora_magnitude_vector" in mags and len(mags) == len(list(lora_layers(ours)))
    for k, g in ref.items():
        assert mine[k].shape == g.shape and g.abs().max() > 0, k
        assert (mine[k] - g).abs().max().item() <= TOL * max(1.0, g.abs().max().item()), k


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_initial_magnitude_and_shapes_equal_peft(kind):
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True)
    ours = add_adapter(build(kind), LoraConfig(**kw))  # peft's default init: the adapter starts as a no-op
    theirs = get_peft_model(build(kind), PeftLoraConfig(**kw))
    for path, layer in lora_layers(ours):
        m, ref = layer.lora_magnitude_vector["default"], peft_layer(theirs, path).lora_magnitude_vector["default"]
        assert m.dtype == torch.float32 and m.shape == ref.weight.shape
        assert (m - ref.weight).abs().max().item() <= 1e-6 * ref.weight.abs().max().item(), path
    emb_or_conv = ours.get_submodule(PROBE[kind])
    w = emb_or_conv.weight.detach()
    if kind == "llama":  # one value per embedding dimension: the norm runs over the vocabulary
        assert emb_or_conv.lora_magnitude_vector["default"].shape == (64,)
        expected = torch.linalg.norm(w, dim=0)  # A = 0 at the start
    else:  # peft's conv layout (1, out, 1, 1): the norm runs over in * kh * kw
        assert emb_or_conv.lora_magnitude_vector["default"].shape == (1, 8, 1, 1)
        expected = (w + emb_or_conv.delta_weight("default")).flatten(1).norm(dim=1).view(1, 8, 1, 1)
    assert (emb_or_conv.lora_magnitude_vector["default"] - expected).abs().max().item() <= 1e-5
    assert (evaluate(ours, kind) - evaluate(build(kind), kind)).abs().max().item() <= TOL


def test_conv_dropout_in_training_equals_peft():
    """With dropout peft convolves the dropped-out input with the base kernel instead of using y - b."""
    ours, theirs = pair("cnn", lora_dropout=0.3)
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(1234)  # same masks, drawn in the same order
        out = loss(model, "cnn", 3)
        out.backward()
        losses.append(out.item())
    assert losses[0] == pytest.approx(losses[1], abs=TOL)
    mine, ref = grads_in_file_layout(ours, theirs)
    for k, g in ref.items():
        assert (mine[k] - g).abs().max().item() <= TOL * max(1.0, g.abs().max().item()), k
    ours.eval(), theirs.eval()
    assert (evaluate(ours, "cnn") - evaluate(theirs, "cnn")).abs().max().item() <= TOL


def test_scaled_embedding_with_padding_idx_equals_peft():
    """embed_scale multiplies the adapter part only after the norm; the padding row gets no gradient."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    def net():
        torch.manual_seed(0)
        return nn.Sequential(Gemma3TextScaledWordEmbedding(20, 6, padding_idx=3, embed_scale=2.5))

    kw = dict(r=3, lora_alpha=6, target_modules=["0"], use_dora=True, init_lora_weights=False)
    ours = add_adapter(net(), LoraConfig(**kw))
    perturb(ours)
    theirs = get_peft_model(net(), PeftLoraConfig(**kw))
    set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    ids = torch.tensor([[3, 1, 3, 7, 19], [0, 3, 5, 5, 2]])
    a, b = ours(ids), theirs(ids)
    assert (a - b).abs().max().item() <= TOL
    layer = ours[0]
    with torch.no_grad():
        A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.lora_scaling["default"]
        m = layer.lora_magnitude_vector["default"]
        f = m / torch.linalg.norm(layer.weight.T + s * B @ A, dim=1)
        expect = f * (layer.weight[ids] + s * A.T[ids] @ B.T) * 2.5
    assert (a - expect).abs().max().item() <= TOL
    a.square().sum().backward()
    b.square().sum().backward()
    assert layer.lora_A["default"].grad[:, 3].abs().max() == 0
    ref = peft_layer(theirs, "0").lora_magnitude_vector["default"].weight.grad
    assert (layer.lora_magnitude_vector["default"].grad - ref).abs().max() <= TOL * ref.abs().max()


def test_bf16_embedding_base_equals_peft():
    kw = dict(r=4, target_modules=["embed_tokens"], use_dora=True, init_lora_weights=False)
    ours = add_adapter(build("llama").to(torch.bfloat16), LoraConfig(**kw))
    perturb(ours)
    theirs = get_peft_model(build("llama").to(torch.bfloat16), PeftLoraConfig(**kw))
    set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert ours.model.embed_tokens.lora_magnitude_vector["default"].dtype == torch.float32
    got = evaluate(ours, "llama")
    assert got.dtype == torch.bfloat16 and torch.equal(got, evaluate(theirs, "llama"))


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_autocast_close_to_peft(kind):
    ours, theirs = pair(kind)
    x = batch(kind, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = run(ours, kind, x), run(theirs, kind, x)
    assert got.dtype == expected.dtype
    assert (got.float() - expected.float()).abs().max().item() <= 1e-2 * expected.abs().max().item()


# ---- files both ways ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_tuneforge_file_loads_in_peft(tmp_path, kind):
    ours = add_adapter(build(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - evaluate(build(kind), kind)).abs().max() > 1e-3
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    if kind == "llama":
        assert sd["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (64,)
    else:
        assert sd["base_model.model.conv2.lora_magnitude_vector"].shape == (1, 8, 1, 1)
        assert sd["base_model.model.mix.lora_magnitude_vector"].shape == (1, 6, 1, 1)
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "a")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_peft_file_loads_in_tuneforge(tmp_path, kind):
    theirs = get_peft_model(build(kind), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True))
    train(theirs, kind)
    expected = evaluate(theirs, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Setting save_embedding_layers to True ..."
        theirs.save_pretrained(str(tmp_path / "p"))
    mine = load_adapter(build(kind), tmp_path / "p", is_trainable=True)
    assert list_adapters(mine)["default"].use_dora is True
    got = evaluate(mine, kind)
    assert (got - evaluate(build(kind), kind)).abs().max() > 1e-3
    assert (got - expected).abs().max().item() <= TOL
    assert mine.get_submodule(PROBE[kind]).lora_magnitude_vector["default"].requires_grad
    save_adapter(mine, tmp_path / "again")  # re-saving gives peft's adapter tensors back
    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    a = {k: v for k, v in a.items() if not k.endswith(".base_layer.weight")}  # peft's copy of the base embedding
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- merge / unmerge / disable / unload ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_merge_unmerge_disable_unload(kind):
    ours, theirs = pair(kind)
    base = evaluate(build(kind), kind)
    adapted = evaluate(ours, kind)
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with disable_adapters(ours):
        assert torch.equal(evaluate(ours, kind), base)

    assert merge_adapters(ours, safe_merge=True) == ["default"]
    assert (evaluate(ours, kind) - adapted).abs().max().item() <= TOL
    with disable_adapters(ours):
        assert (evaluate(ours, kind) - base).abs().max().item() <= TOL
    assert (evaluate(ours, kind) - adapted).abs().max().item() <= TOL
    ref = theirs.merge_and_unload().state_dict()  # the merged weights are peft's
    merged = ours.state_dict()
    for k in weights:
        assert (merged[k] - ref[k]).abs().max().item() <= TOL, k

    assert unmerge_adapters(ours) == ["default"]
    restored = ours.state_dict()
    for k, v in weights.items():  # undoing f * (W + s B A) costs a few roundings of the merged values
        assert (restored[k] - v).abs().max().item() <= TOL, k
    assert (evaluate(ours, kind) - adapted).abs().max().item() <= TOL
    plain = unload(ours, merge=True)
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in build(kind).named_modules()}
    assert list(plain.state_dict()) == list(build(kind).state_dict())
    assert (evaluate(plain, kind) - adapted).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_safe_merge_refuses_nan_magnitude(kind):
    ours, _ = pair(kind)
    with torch.no_grad():
        ours.get_submodule(PROBE[kind]).lora_magnitude_vector["default"].view(-1)[2] = float("nan")
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with pytest.raises(ModelError, match="NaN"):
        merge_adapters(ours, safe_merge=True)
    assert all(torch.equal(weights[k], ours.state_dict()[k]) for k in weights)
    assert not any(m.lora_merged for _, m in lora_layers(ours))


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_several_adapters_mixed_dora_and_lora_match_peft(tmp_path, kind):
    """peft's rule: each DoRA adapter rescales what the adapters before it produced; merges stack."""
    layer_path = PROBE[kind]
    other = "model.layers.0.self_attn.q_proj" if kind == "llama" else "mix"
    specs = {
        "a": dict(r=4, target_modules=[layer_path, other], use_dora=True),
        "b": dict(r=2, lora_alpha=4, target_modules=[layer_path]),
        "c": dict(r=2, lora_alpha=2, target_modules=[layer_path, other], use_dora=True),
    }
    model = build(kind)
    for i, (name, kw) in enumerate(specs.items()):
        add_adapter(model, LoraConfig(init_lora_weights=False, **kw), name)
        perturb(model, name, seed=i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_adapter(model, tmp_path / name, name=name)
    order = ["a", "b", "c"]
    set_active_adapters(model, order)
    ours = evaluate(model, kind)
    theirs = PeftModel.from_pretrained(build(kind), str(tmp_path / "a"), adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    theirs.base_model.set_adapter(order)
    assert (evaluate(theirs.eval(), kind) - ours).abs().max().item() <= TOL

    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_adapters(model) == order
    assert (evaluate(model, kind) - ours).abs().max().item() <= TOL
    assert unmerge_adapters(model) == order
    assert max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items()) <= TOL
    merge_adapters(model, ["a"])  # b and c run over the merged a
    assert (evaluate(model, kind) - ours).abs().max().item() <= TOL
    merge_adapters(model, ["b", "c"])
    assert (evaluate(model, kind) - ours).abs().max().item() <= TOL
    unmerge_adapters(model)
    assert max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items()) <= TOL


# ---- cost and refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["embedding", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_forward_never_forms_the_adapted_weight(kind, dropout):
    """The norm of W + sBA is taken without forming that weight-sized tensor, in forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if not func.is_view:  # views (weight.t(), weight.flatten(1)) allocate nothing
                for t in result if isinstance(result, (tuple, list)) else [result]:
                    if isinstance(t, torch.Tensor):
                        self.seen.append(tuple(t.shape))
            return result

    if kind == "embedding":
        net, x = nn.Sequential(nn.Embedding(50, 24)), torch.randint(0, 50, (3, 7))
    else:
        k = 3 if kind == "conv3x3" else 1
        net, x = nn.Sequential(nn.Conv2d(6, 10, k, padding=k // 2)), torch.randn(2, 6, 5, 5)
    cfg = LoraConfig(r=4, target_modules=["0"], use_dora=True, lora_dropout=dropout, init_lora_weights=False)
    add_adapter(net, cfg)
    net.train()
    w = net[0].weight
    forbidden = {tuple(w.shape), tuple(w.shape[::-1]), (w.shape[0], w[0].numel()), (w[0].numel(), w.shape[0])}
    with Shapes() as rec:
        net(x).square().sum().backward()
    assert not [s for s in rec.seen if s in forbidden]
    assert w.grad is None
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter_tensors(net, "default").values())


def test_grouped_conv_dora_is_refused_before_anything_changes():
    net = SmallCNN(groups=2)
    warnings.simplefilter("ignore")  # "groups=2: ... cannot be merged" (plain LoRA's warning)
    with pytest.raises(ConfigError, match="conv2.*groups=2.*DoRA"):
        add_adapter(net, LoraConfig(r=4, target_modules=["conv1", "conv2"], use_dora=True))
    assert not any(isinstance(m, LoraLayer) for m in net.modules()) and list_adapters(net) == {}
    add_adapter(net, LoraConfig(r=4, target_modules=["conv1", "conv2"]))  # plain LoRA still works on it
    with pytest.raises(ConfigError, match="groups=2"):
        net.conv2.add_lora("x", 4, 4, 0.0, False, True, use_dora=True)
    assert "x" not in net.conv2.lora_A
