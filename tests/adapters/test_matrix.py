"""The issue-3 matrix: every (model, LoRA configuration) pair checked against peft four ways.

Models: tiny Llama, Qwen2 (q/k/v biases), GPT-2 (Conv1D), BERT for sequence classification
(classifier in modules_to_save) and a small CNN. Configurations: LoRA, rsLoRA, DoRA, rank/alpha
patterns, layers_to_transform, embedding LoRA (plain and DoRA), bias modes. For each pair:
1. same weights -> same outputs and the same gradients as peft (compared in peft's file layout);
2. tuneforge trains and saves -> peft loads -> same outputs;
3. peft trains and saves -> tuneforge loads -> same outputs;
4. merge == unmerged, unmerge restores the base weights, disable == base model.
Routing and combining have their own files (test_routing.py, test_combine.py).
"""

from __future__ import annotations

import pytest
import torch
from adapter_testkit import VOCAB, make_model
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from tuneforge.adapters import (
    LoraConfig,
    add_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from tuneforge.adapters.peft_format import adapter_state_dict

TOL = 1e-5


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = self.mix(h)
        return self.fc(h.flatten(1))


class Conv1dNet(nn.Module):
    """Takes the CNN's (batch, 3, 8, 8) images as 3 channels of length 64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.point = nn.Conv1d(6, 4, 1)
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.point(torch.relu(self.conv(x.flatten(2))))
        return self.fc(h.flatten(1))


IMAGES = ("cnn", "conv1d")  # the kinds that take images, not tokens


def build(kind: str, seed: int = 0) -> nn.Module:
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(cfg).eval()
    if kind in IMAGES:
        torch.manual_seed(seed)
        return (SmallCNN() if kind == "cnn" else Conv1dNet()).eval()
    if kind == "gpt2":  # untied: merging an embedding LoRA into a tied wte would change lm_head too
        return make_model(kind, seed=seed, tie_word_embeddings=False)
    return make_model(kind, seed=seed)


def batch(kind: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind in IMAGES:
        return {"x": torch.randn(3, 3, 8, 8, generator=g), "y": torch.randint(0, 5, (3,), generator=g)}
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (2,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def outputs(model: nn.Module, kind: str, b: dict) -> torch.Tensor:
    if kind in IMAGES:
        return model(b["x"])
    return model(input_ids=b["input_ids"]).logits


def loss(model: nn.Module, kind: str, b: dict) -> torch.Tensor:
    if kind in IMAGES:
        return nn.functional.cross_entropy(model(b["x"]), b["y"])
    return model(**b).loss


def evaluate(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return outputs(model, kind, batch(kind, 1))


def train(model: nn.Module, kind: str, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        loss(model, kind, batch(kind, 100 + step)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


# module names per model: a few targets, a layer pattern and the embedding
NAMES = {
    "llama": dict(targets=["q_proj", "v_proj", "down_proj"], layers="layers", embed="embed_tokens", rank="v_proj"),
    "qwen2": dict(targets=["q_proj", "k_proj", "o_proj"], layers="layers", embed="embed_tokens", rank="k_proj"),
    "gpt2": dict(targets=["c_attn", "c_fc"], layers="h", embed="wte", rank="c_fc"),
    "bert": dict(targets=["query", "value", "output.dense"], layers="layer", embed="word_embeddings", rank="value"),
    "cnn": dict(targets=["conv1", "conv2", "mix", "fc"], layers=None, embed=None, rank="mix"),
}


def config(kind: str, variant: str) -> dict:
    n = NAMES[kind]
    kw: dict = dict(r=4, lora_alpha=8, target_modules=list(n["targets"]))
    if kind == "bert":
        kw["modules_to_save"] = ["classifier"]
    if variant == "all-linear":
        kw["target_modules"] = "all-linear"
    elif variant == "rslora":
        kw.update(r=8, lora_alpha=16, use_rslora=True)
    elif variant == "dora":
        kw.update(use_dora=True)
    elif variant == "patterns":
        kw.update(rank_pattern={n["rank"]: 2}, alpha_pattern={n["rank"]: 3})
    elif variant == "layers":
        kw.update(layers_to_transform=[1], layers_pattern=n["layers"])
    elif variant == "embedding":
        kw["target_modules"] = kw["target_modules"] + [n["embed"]]
    elif variant == "embedding-dora":
        kw.update(target_modules=kw["target_modules"] + [n["embed"]], use_dora=True)
    elif variant in ("bias-all", "bias-lora_only"):
        kw["bias"] = variant.removeprefix("bias-")
    return kw


VARIANTS = [
    "lora", "all-linear", "rslora", "dora", "patterns", "layers", "embedding", "embedding-dora", "bias-all",
    "bias-lora_only",
]  # fmt: skip
# pairs that do not exist: no transformer layers or embedding in the CNN; BERT's modules_to_save
# head is a Linear, so all-linear would target it too (peft refuses that combination as well)
NOT_APPLICABLE = {
    ("cnn", "layers"), ("cnn", "embedding"), ("cnn", "embedding-dora"), ("bert", "all-linear"), ("cnn", "all-linear"),
}  # fmt: skip
CASES = [(k, v) for k in NAMES for v in VARIANTS if (k, v) not in NOT_APPLICABLE]


def same_random_adapters(ours: nn.Module, theirs: nn.Module, std: float) -> tuple[nn.Module, nn.Module]:
    """Moves every trainable tensor of `ours` by N(0, std^2) noise (no adapter left at its no-op
    start), then copies them into peft's model `theirs` through peft's own state-dict loader."""
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


def pair(kind: str, kw: dict):
    """(ours, peft) with identical base weights and identical random adapter weights (B != 0)."""
    ours = add_adapter(build(kind), LoraConfig(init_lora_weights=False, **kw))
    theirs = get_peft_model(build(kind), PeftLoraConfig(init_lora_weights=False, **kw))
    return same_random_adapters(ours, theirs, std=0.05)


def peft_layout(sd: dict) -> dict:
    # peft's state dict holds the live parameters: copy them
    return {k.removeprefix("base_model.model."): v.detach().clone() for k, v in sd.items()}


def gradients_in_file_layout(model: nn.Module, kind: str, is_peft: bool) -> dict:
    """d loss / d adapter tensors, keyed as in the adapter file (SGD with lr=1 reads them off)."""
    model.train()
    before = peft_layout(get_peft_model_state_dict(model) if is_peft else adapter_state_dict(model))
    params = [p for p in model.parameters() if p.requires_grad]
    loss(model, kind, batch(kind, 7)).backward()
    torch.optim.SGD(params, lr=1.0).step()
    after = peft_layout(get_peft_model_state_dict(model) if is_peft else adapter_state_dict(model))
    model.eval()
    # peft also lists frozen tensors: the bias of the modules_to_save original and a second name for
    # its copy's bias (bias='all'), and an adapted embedding's base weight
    skip = (".original_module.", ".modules_to_save.", ".base_layer.weight")
    return {k: before[k] - after[k] for k in before if not any(s in k for s in skip)}


def assert_same_as_peft(ours: nn.Module, theirs: nn.Module, kind: str, base: torch.Tensor) -> dict:
    """Our adapted model and peft's (same weights) give the same outputs, which differ from the
    base model's `base`, and the same gradients; returns ours, keyed as in the adapter file."""
    got, expected = evaluate(ours, kind), evaluate(theirs, kind)
    assert (got - base).abs().max() > 1e-3, "the adapter changes nothing; the case proves nothing"
    assert (got - expected).abs().max().item() <= TOL
    g_ours = gradients_in_file_layout(ours, kind, is_peft=False)
    g_peft = gradients_in_file_layout(theirs, kind, is_peft=True)
    assert sorted(g_ours) == sorted(g_peft)
    for key in g_ours:
        torch.testing.assert_close(g_ours[key], g_peft[key], atol=1e-5, rtol=1e-4, msg=key)
    return g_ours


def assert_peft_file_loads(theirs: nn.Module, kind: str, config_class: type, tmp_path) -> nn.Module:
    """peft trains `theirs` and saves it; tuneforge loads the file onto a fresh model as a
    `config_class` adapter with the same outputs. Returns tuneforge's model."""
    train(theirs, kind)
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine = load_adapter(build(kind), tmp_path / "peft")
    assert isinstance(list_adapters(mine)["default"], config_class)
    assert (evaluate(mine, kind) - evaluate(theirs, kind)).abs().max().item() <= TOL
    return mine


@pytest.mark.parametrize("kind,variant", CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_matrix(tmp_path, kind, variant):
    kw = config(kind, variant)

    # 1. same weights: same outputs and gradients
    ours, theirs = pair(kind, kw)
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours, theirs, kind, base)
    assert any(g.abs().max() > 0 for g in g_ours.values())

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), LoraConfig(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(build(kind), PeftLoraConfig(**kw))
    train(theirs, kind)
    theirs.save_pretrained(str(tmp_path / "peft"))
    mine = load_adapter(build(kind), tmp_path / "peft")
    assert (evaluate(mine, kind) - evaluate(theirs, kind)).abs().max().item() <= TOL

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=0, msg=k)
    plain = build(kind)  # the base model, with the biases that bias='all'/'lora_only' trained in place
    plain.load_state_dict(weights, strict=False)
    with disable_adapters(ours):
        assert (evaluate(ours, kind) - evaluate(plain, kind)).abs().max().item() <= 1e-6
    assert (evaluate(ours, kind) - trained).abs().max().item() <= 1e-6
