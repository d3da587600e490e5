"""LoRA on nn.Embedding and nn.Conv2d, with peft as the oracle: maths, init, files both ways, merge."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from adapter_testkit import VOCAB, make_model
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.adapters import (
    LoraConfig,
    LoraConv2d,
    LoraEmbedding,
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
from tuneforge.adapters.core import lora_layers
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError

TOL = 1e-5


class SmallCNN(nn.Module):
    """3x3 conv, strided 3x3 conv without padding, 1x1 conv, then a linear head."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, groups=groups)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(self.conv3(h).flatten(1))


def build(kind: str, seed: int = 0, **kw) -> nn.Module:
    if kind == "cnn":
        torch.manual_seed(seed)
        return SmallCNN(**kw).eval()
    return make_model("llama", seed=seed, **kw)


TARGETS = {"llama": ["embed_tokens", "q_proj"], "cnn": ["conv1", "conv2", "conv3", "fc"]}


def batch(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        return torch.randn(3, 3, 8, 8, generator=g)
    return torch.randint(0, VOCAB, (2, 9), generator=g)


def run(model: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    return model(x) if kind == "cnn" else model(input_ids=x).logits


def evaluate(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return run(model, kind, batch(kind, 1))


def loss(model: nn.Module, kind: str, seed: int) -> torch.Tensor:
    x = batch(kind, seed)
    if kind == "cnn":
        return run(model, kind, x).square().mean()
    return model(input_ids=x, labels=x).loss


def train(model: nn.Module, kind: str, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss(model, kind, 100 + step).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def pair(kind: str, names=("default",), **kw):
    """(ours, peft) with identical base weights and identical random (non-zero) adapter weights."""
    kw.setdefault("target_modules", TARGETS[kind])
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    ours = build(kind)
    for n in names:
        add_adapter(ours, LoraConfig(init_lora_weights=False, **kw), n)
    set_active_adapters(ours, list(names))
    perturb(ours)
    theirs = get_peft_model(build(kind), PeftLoraConfig(init_lora_weights=False, **kw), adapter_name=names[0])
    for n in names[1:]:
        theirs.add_adapter(n, PeftLoraConfig(init_lora_weights=False, **kw))
    for n in names:
        result = set_peft_model_state_dict(theirs, adapter_state_dict(ours, n), adapter_name=n)
        assert not result.unexpected_keys, result.unexpected_keys
    theirs.base_model.set_adapter(list(names))
    return ours, theirs


def file_key(peft_param_name: str) -> str:
    return peft_param_name.removeprefix("base_model.model.").replace(".default", "")


# ---- (a) same weights: same outputs and gradients -------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_forward_and_gradients_equal_peft(kind):
    ours, theirs = pair(kind)
    assert isinstance(ours.model.embed_tokens if kind == "llama" else ours.conv2, (LoraEmbedding, LoraConv2d))
    got, expected = evaluate(ours, kind), evaluate(theirs, kind)
    assert (got - evaluate(build(kind), kind)).abs().max() > 1e-3
    assert (got - expected).abs().max().item() <= TOL

    for model in (ours, theirs):
        model.train()
        loss(model, kind, 7).backward()
    mine = {f"{path}.{k}": t.grad for path, m in lora_layers(ours) for k, t in m.peft_tensors("default").items()}
    ref = {file_key(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(ref)
    assert any("lora_embedding_A" in k for k in mine) or kind == "cnn"
    for k, g in ref.items():
        assert g.abs().max() > 0, k
        assert (mine[k] - g).abs().max().item() <= TOL * max(1.0, g.abs().max().item()), k


def test_embedding_uses_base_lookup_options_and_no_dropout():
    """padding_idx (no gradient to that row), embed_scale of a scaled embedding; lora_dropout unused (as peft)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    def net():
        torch.manual_seed(0)
        return nn.Sequential(Gemma3TextScaledWordEmbedding(20, 6, padding_idx=3, embed_scale=2.5))

    kw = dict(r=3, lora_alpha=6, target_modules=["0"], lora_dropout=0.5)
    ours = add_adapter(net(), LoraConfig(init_lora_weights=False, **kw))
    theirs = get_peft_model(net(), PeftLoraConfig(init_lora_weights=False, **kw))
    set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    layer = ours[0]
    assert isinstance(layer, LoraEmbedding) and isinstance(layer, Gemma3TextScaledWordEmbedding)
    ids = torch.tensor([[3, 1, 3, 7, 19], [0, 3, 5, 5, 2]])
    ours.train(), theirs.train()  # dropout would show up in training mode
    a, b = ours(ids), theirs(ids)
    assert (a - b).abs().max().item() <= TOL and torch.equal(ours(ids), a)
    with torch.no_grad():
        A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.lora_scaling["default"]
        expect = (layer.weight[ids] + s * A.T[ids] @ B.T) * 2.5
    assert (a - expect).abs().max().item() <= TOL
    a.square().sum().backward()
    assert layer.lora_A["default"].grad[:, 3].abs().max() == 0  # padding row gets no gradient
    assert layer.lora_A["default"].grad[:, 1].abs().max() > 0


def test_conv_dropout_as_peft():
    ours, theirs = pair("cnn", lora_dropout=0.3)
    x = batch("cnn", 3)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    a = ours(x)
    torch.manual_seed(11)
    b = theirs(x)
    assert (a - b).abs().max().item() <= TOL  # same masks, drawn in the same order
    torch.manual_seed(12)
    assert not torch.allclose(ours(x), a)


def test_bf16_embedding_base_matches_peft():
    ours = add_adapter(build("llama").to(torch.bfloat16), LoraConfig(r=4, target_modules=["embed_tokens"]))
    perturb(ours)
    theirs = get_peft_model(build("llama").to(torch.bfloat16), PeftLoraConfig(r=4, target_modules=["embed_tokens"]))
    set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert ours.model.embed_tokens.lora_A["default"].dtype == torch.float32
    got = evaluate(ours, "llama")
    assert got.dtype == torch.bfloat16 and torch.equal(got, evaluate(theirs, "llama"))


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_autocast_matches_peft(kind):
    ours, theirs = pair(kind)
    x = batch(kind, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = run(ours, kind, x), run(theirs, kind, x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


# ---- (b) / (c) files both ways ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_tuneforge_file_loads_in_peft(tmp_path, kind):
    ours = add_adapter(build(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind]))
    assert torch.equal(evaluate(ours, kind), evaluate(build(kind), kind))  # peft's init starts as a no-op
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - evaluate(build(kind), kind)).abs().max() > 1e-4
    save_adapter(ours, tmp_path / "a")

    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    if kind == "llama":
        assert sd["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, VOCAB)
        assert sd["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, 4)
        assert not any("base_layer" in k for k in sd)  # the base embedding is not copied into the file
    else:
        assert sd["base_model.model.conv2.lora_A.weight"].shape == (4, 8, 3, 3)
        assert sd["base_model.model.conv2.lora_B.weight"].shape == (8, 4, 1, 1)
        assert sd["base_model.model.conv3.lora_A.weight"].shape == (4, 8, 1, 1)
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "a")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_peft_file_loads_in_tuneforge(tmp_path, kind):
    theirs = get_peft_model(build(kind), PeftLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind]))
    train(theirs, kind)
    expected = evaluate(theirs, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Setting save_embedding_layers to True ..."
        theirs.save_pretrained(str(tmp_path / "p"))
    mine = load_adapter(build(kind), tmp_path / "p")
    got = evaluate(mine, kind)
    assert (got - evaluate(build(kind), kind)).abs().max() > 1e-4
    assert (got - expected).abs().max().item() <= TOL
    assert not any(p.requires_grad for p in mine.parameters())


def test_peft_saved_base_embedding_is_loaded_as_peft_does(tmp_path):
    """peft writes `embed_tokens.base_layer.weight` beside the embedding LoRA and loads it into the base."""
    theirs = get_peft_model(build("llama"), PeftLoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    train(theirs, "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "p"))
    f = tmp_path / "p" / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in sd
    sd[key] = sd[key] + 0.5 * torch.randn_like(sd[key])  # e.g. a resized, trained vocabulary
    save_file(sd, str(f))
    expected = evaluate(PeftModel.from_pretrained(build("llama"), str(tmp_path / "p")), "llama")
    mine = load_adapter(build("llama"), tmp_path / "p")
    assert torch.equal(mine.model.embed_tokens.weight, sd[key])
    assert (evaluate(mine, "llama") - expected).abs().max().item() <= TOL


# ---- (d) merge / unmerge / disable / unload ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_merge_unmerge_disable_unload(kind):
    ours, theirs = pair(kind)
    base = evaluate(build(kind), kind)
    adapted = evaluate(ours, kind)
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    with disable_adapters(ours):
        assert torch.equal(evaluate(ours, kind), base)

    assert merge_adapters(ours) == ["default"]
    assert (evaluate(ours, kind) - adapted).abs().max().item() <= TOL
    # merged weights equal peft's merged weights
    ref = theirs.merge_and_unload().state_dict()
    merged = ours.state_dict()
    for k in weights:
        assert (merged[k] - ref[k]).abs().max().item() <= 1e-6, k
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        assert (restored[k] - v).abs().max().item() <= 1e-6, k
    with disable_adapters(ours):
        assert (evaluate(ours, kind) - base).abs().max().item() <= TOL
    assert (evaluate(ours, kind) - adapted).abs().max().item() <= TOL

    plain = unload(ours, merge=True)
    types = {n: type(m) for n, m in build(kind).named_modules()}
    assert {n: type(m) for n, m in plain.named_modules()} == types
    assert list(plain.state_dict()) == list(build(kind).state_dict())
    assert (evaluate(plain, kind) - adapted).abs().max().item() <= TOL


def test_tied_embedding_merge_changes_head_like_peft():
    kw = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    ours = build("llama", tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with pytest.warns(UserWarning, match="tied"):
        add_adapter(ours, LoraConfig(init_lora_weights=False, **kw))
    perturb(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: ensure_weight_tying advice
        theirs = get_peft_model(build("llama", tie_word_embeddings=True), PeftLoraConfig(init_lora_weights=False, **kw))
    set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert (evaluate(ours, "llama") - evaluate(theirs, "llama")).abs().max().item() <= TOL
    head = ours.lm_head.weight.clone()
    merge_adapters(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
    assert not torch.equal(ours.lm_head.weight, head)  # the head shares the weight: it changes too
    assert (evaluate(ours, "llama") - evaluate(theirs, "llama")).abs().max().item() <= TOL


# ---- (e) init ----------------------------------------------------------------------------------------
def _peft_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_init_statistics_match_peft():
    r = 8
    torch.manual_seed(0)
    ours = add_adapter(build("llama"), LoraConfig(r=r, target_modules=["embed_tokens"]))
    theirs = _peft_layers(get_peft_model(build("llama"), PeftLoraConfig(r=r, target_modules=["embed_tokens"])))
    emb, ref = ours.model.embed_tokens, theirs["model.embed_tokens"]
    A, B = emb.lora_A["default"], emb.lora_B["default"]
    rA, rB = ref.lora_embedding_A["default"], ref.lora_embedding_B["default"]
    assert A.shape == rA.shape == (r, VOCAB) and B.shape == rB.shape == (64, r)
    assert torch.count_nonzero(A) == torch.count_nonzero(rA) == 0
    assert B.std().item() == pytest.approx(1.0, rel=0.1) and rB.std().item() == pytest.approx(1.0, rel=0.1)
    for init in ("gaussian", False):  # gaussian is the default for embeddings; False leaves randn in both
        emb = add_adapter(build("llama"), LoraConfig(r=r, target_modules=["embed_tokens"], init_lora_weights=init))
        A = emb.model.embed_tokens.lora_A["default"]
        assert (torch.count_nonzero(A) == 0) == (init == "gaussian")
        if init is False:
            assert A.std().item() == pytest.approx(1.0, rel=0.1)

    ours = add_adapter(build("cnn"), LoraConfig(r=r, target_modules=["conv1", "conv2", "conv3"]))
    theirs = _peft_layers(get_peft_model(build("cnn"), PeftLoraConfig(r=r, target_modules=["conv1", "conv2", "conv3"])))
    for path, layer in lora_layers(ours):
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        rA, rB = theirs[path].lora_A["default"].weight, theirs[path].lora_B["default"].weight
        assert A.shape == rA.shape and B.shape == rB.shape
        assert torch.count_nonzero(B) == torch.count_nonzero(rB) == 0
        bound = 1 / math.sqrt(A[0].numel())  # kaiming_uniform(a=sqrt(5)) over fan_in = in * kh * kw
        assert A.abs().max() <= bound and rA.abs().max() <= bound
        assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.35)
    conv = add_adapter(build("cnn"), LoraConfig(r=r, target_modules=["conv2"], init_lora_weights="gaussian")).conv2
    assert conv.lora_A["default"].std().item() == pytest.approx(1 / r, rel=0.2)
    conv = add_adapter(build("cnn"), LoraConfig(r=r, target_modules=["conv2"], init_lora_weights=False)).conv2
    assert torch.count_nonzero(conv.lora_B["default"]) > 0


# ---- (f) several active adapters ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "cnn"])
def test_two_active_adapters_sum_like_peft(kind):
    ours, theirs = pair(kind, names=("one", "two"))
    assert (evaluate(ours, kind) - evaluate(theirs, kind)).abs().max().item() <= TOL
    layer = ours.model.embed_tokens if kind == "llama" else ours.conv2
    x = torch.tensor([[1, 2, 200]]) if kind == "llama" else torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        both = layer(x)
        with disable_adapters(ours):
            base = layer(x)
        deltas = []
        for n in ("one", "two"):
            set_active_adapters(ours, n)
            deltas.append(layer(x) - base)
        assert all(d.abs().max() > 1e-3 for d in deltas)
        assert (both - base - deltas[0] - deltas[1]).abs().max().item() <= TOL
    set_active_adapters(ours, ["one", "two"])
    merge_adapters(ours)
    assert (evaluate(ours, kind) - evaluate(theirs, kind)).abs().max().item() <= TOL


# ---- targets, refusals and config -------------------------------------------------------------------
def test_all_linear_leaves_embeddings_and_convs_alone():
    model = add_adapter(build("llama"), LoraConfig(target_modules="all-linear"))
    assert not isinstance(model.model.embed_tokens, LoraEmbedding)
    cnn = add_adapter(build("cnn"), LoraConfig(target_modules="all-linear"))
    assert [p for p, _ in lora_layers(cnn)] == ["fc"]


@pytest.mark.parametrize(
    "conv,r,match",
    [
        (nn.Conv2d(4, 4, 3, dilation=2), 2, "dilation"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2, "padding_mode"),
        (nn.Conv2d(4, 4, 3, groups=4), 2, "groups=4.*r=2"),
    ],
)
def test_unsupported_conv_shapes_are_refused_untouched(conv, r, match):
    net = nn.Sequential(conv, nn.Conv2d(4, 4, 1))
    with pytest.raises(ConfigError, match=match):
        add_adapter(net, LoraConfig(r=r, target_modules=["0", "1"]))
    assert type(net[0]) is nn.Conv2d and type(net[1]) is nn.Conv2d and list_adapters(net) == {}


def test_dilated_1x1_conv_is_fine():
    net = nn.Sequential(nn.Conv2d(4, 4, 1, dilation=2))
    add_adapter(net, LoraConfig(r=2, target_modules=["0"]))
    assert isinstance(net[0], LoraConv2d)


def test_grouped_conv_runs_like_peft_but_refuses_merge():
    kw = dict(r=4, lora_alpha=8, target_modules=["conv2", "conv3"], init_lora_weights=False)
    torch.manual_seed(0)
    ours = SmallCNN(groups=2).eval()
    with pytest.warns(UserWarning, match="groups=2"):
        add_adapter(ours, LoraConfig(**kw))
    assert ours.conv2.lora_B["default"].shape == (8, 2, 1, 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(SmallCNN(groups=2).eval(), PeftLoraConfig(**kw))
    perturb(ours)
    set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    x = batch("cnn", 1)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= TOL
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ConfigError, match="conv2.*groups=2"):
        merge_adapters(ours)
    with pytest.raises(ConfigError, match="groups=2"):
        unload(ours, merge=True)
    assert all(torch.equal(weights[k], v) for k, v in ours.state_dict().items())  # nothing half merged
    assert not any(m.lora_merged for _, m in lora_layers(ours))


def test_unsupported_type_lists_supported_ones():
    net = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(ConfigError, match="Conv1d.*supported: .*Embedding.*Conv2d"):
        add_adapter(net, LoraConfig(target_modules=["0"]))


def test_fan_in_fan_out_does_not_apply_to_embeddings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = add_adapter(build("llama"), LoraConfig(target_modules=["embed_tokens"]))
    save_adapter(model, tmp_path / "a")
    import json

    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
