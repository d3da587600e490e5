"""BOFT through the method seams, checked against peft four ways (as test_oft.py does for OFT) on
tiny Llama, Qwen2 (q/k/v biases) and BERT (classifier in modules_to_save).

peft builds BOFT's block-diagonal matrices with a CUDA extension; where it cannot be built (CPU)
peft falls back to torch.block_diag and silently trains boft_n_butterfly_factor=1 whatever the
config says. So: one butterfly factor is compared with that fallback as peft runs it; two and
three factors with peft's own code where the extension is replaced by a pure-torch stand-in
(`FakeFastBlockDiag`: the same block diagonal and its gradient), which is what peft computes on CUDA.
"""

from __future__ import annotations

import json

import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from peft import BOFTConfig as PeftBOFTConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from test_matrix import assert_peft_file_loads, assert_same_as_peft, build, evaluate, train

import tuneforge
from tuneforge.adapters import (
    BOFTConfig,
    add_adapter,
    disable_adapters,
    list_adapters,
    merge_adapters,
    save_adapter,
    set_active_adapters,
    unload,
    unmerge_adapters,
)
from tuneforge.adapters.boft import butterfly_perm
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError

TOL = 1e-5
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "bert": ["query", "value", "output.dense"],
}
VARIANTS = {  # (config, peft runs with the CUDA stand-in)
    "m1": (dict(boft_block_size=8), False),
    "m2-num-bias": (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, bias="boft_only"), True),
    "m3": (dict(boft_block_size=4, boft_n_butterfly_factor=3), True),
}
CASES = [(k, v) for k in TARGETS for v in VARIANTS]


class FakeFastBlockDiag:
    """peft's fbd_cuda extension in torch: (N, D, H, H) blocks -> (N, D*H, D*H) block diagonals."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*b) for b in blocks])]

    @staticmethod
    def backward(grad, blocks):
        h = blocks.shape[-1]
        return [torch.stack([torch.stack([g[i * h:(i + 1) * h, i * h:(i + 1) * h] for i in range(blocks.shape[1])])
                             for g in grad])]


@pytest.fixture
def peft_backend(monkeypatch):
    def use(cuda_stand_in: bool) -> None:
        monkeypatch.setattr(peft_boft, "_FBD_CUDA", FakeFastBlockDiag if cuda_stand_in else None)
        if not cuda_stand_in:  # the fallback, without trying to compile the extension
            monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)
    return use


def config(kind: str, variant: str) -> dict:
    kw = dict(VARIANTS[variant][0], target_modules=list(TARGETS[kind]))
    if kind == "bert":
        kw["modules_to_save"] = ["classifier"]
    return kw


def pair(kind: str, kw: dict):
    ours = add_adapter(build(kind), BOFTConfig(**kw))
    theirs = get_peft_model(build(kind), PeftBOFTConfig(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    result = set_peft_model_state_dict(theirs, adapter_state_dict(ours))
    assert not result.unexpected_keys, result.unexpected_keys
    return ours, theirs


@pytest.mark.parametrize("kind,variant", CASES, ids=[f"{k}-{v}" for k, v in CASES])
def test_boft_matches_peft(tmp_path, peft_backend, kind, variant):
    kw = config(kind, variant)
    peft_backend(VARIANTS[variant][1])

    # 1. same weights: same outputs and gradients
    ours, theirs = pair(kind, kw)
    factors = kw.get("boft_n_butterfly_factor", 1)
    assert {tuple(t.shape)[0] for k, t in adapter_state_dict(ours).items() if k.endswith("boft_R")} == {factors}
    base = evaluate(build(kind), kind)
    g_ours = assert_same_as_peft(ours, theirs, kind, base)
    assert all(g.abs().max() > 0 for k, g in g_ours.items() if k.endswith((".boft_R", ".boft_s")))
    assert any(k.endswith(".base_layer.bias") for k in g_ours) == ("bias" in variant and kind != "llama")

    # 2. tuneforge trains and saves; peft loads the file
    ours = add_adapter(build(kind), BOFTConfig(**kw))
    train(ours, kind)
    trained = evaluate(ours, kind)
    assert (trained - base).abs().max() > 1e-4, "training changed nothing"
    save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "BOFT" and written["boft_n_butterfly_factor"] == factors
    loaded = PeftModel.from_pretrained(build(kind), str(tmp_path / "ours")).eval()
    assert (evaluate(loaded, kind) - trained).abs().max().item() <= TOL

    # 3. peft trains and saves; tuneforge loads the file
    theirs = get_peft_model(build(kind), PeftBOFTConfig(**kw))
    assert_peft_file_loads(theirs, kind, BOFTConfig, tmp_path)

    # 4. merge == unmerged; unmerge restores the base; disable == base
    weights = {k: v.clone() for k, v in ours.state_dict().items() if "boft_" not in k and "modules_to_save" not in k}
    merge_adapters(ours)
    assert (evaluate(ours, kind) - trained).abs().max().item() <= TOL
    unmerge_adapters(ours)
    restored = ours.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(restored[k], v, atol=1e-5, rtol=1e-5, msg=k)
    if "bias" not in variant:
        with disable_adapters(ours):
            assert (evaluate(ours, kind) - base).abs().max().item() <= 1e-6
    merged = evaluate(unload(ours, merge=True), kind)
    assert (merged - trained).abs().max().item() <= TOL


def test_peft_cpu_fallback_trains_one_factor(peft_backend):
    """What peft does without its CUDA extension: boft_n_butterfly_factor=2 becomes 1."""
    peft_backend(False)
    theirs = get_peft_model(build("llama"), PeftBOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                                                           target_modules=["q_proj"]))
    assert {m.boft_R["default"].shape[0] for m in theirs.modules() if hasattr(m, "boft_R")} == {1}


@pytest.mark.parametrize("n,blocks,half", [(16, 2, 2), (64, 4, 4), (64, 2, 8), (128, 8, 2)])
def test_butterfly_perm_is_peft_s(n, blocks, half):
    layer = peft_boft.BOFTLayer.__new__(peft_boft.BOFTLayer)
    assert torch.equal(butterfly_perm(n, blocks, half), layer.block_butterfly_perm(n, blocks, half, 1))


def test_boft_two_adapters_merge_and_dropout():
    model = build("qwen2")
    for name, seed in (("a", 1), ("b", 2)):
        add_adapter(model, BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "o_proj"],
                                      init_weights=False, boft_dropout=0.5), name)
    set_active_adapters(model, ["a", "b"])
    both = evaluate(model, "qwen2")
    set_active_adapters(model, ["a"])
    assert (evaluate(model, "qwen2") - both).abs().max() > 1e-3
    set_active_adapters(model, ["a", "b"])
    merge_adapters(model)
    assert (evaluate(model, "qwen2") - both).abs().max().item() <= TOL
    unmerge_adapters(model)
    layer = dict(adapter_layers(model))["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer.rotate("a", x), layer.rotate("a", x))
        assert not torch.equal(layer.rotate("a", x, dropout=True), layer.rotate("a", x))


@pytest.mark.parametrize("kw, match", [
    (dict(boft_block_size=4, boft_block_num=16), "set exactly one of boft_block_size and boft_block_num"),
    (dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor must be an integer >= 1"),
    (dict(boft_dropout=-0.1), "boft_dropout must be a number in \\[0, 1\\)"),
    (dict(bias="oft_only"), "bias must be one of \\['none', 'all', 'boft_only'\\]"),
])
def test_boft_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        BOFTConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(boft_block_size=6), "BOFT cannot adapt model.layers.0.self_attn.q_proj: in_features 64 is not divisible "
                              "by boft_block_size 6"),
    (dict(boft_block_size=16, boft_n_butterfly_factor=4), "is not a multiple of boft_block_size x "
                                                          "2\\^\\(boft_n_butterfly_factor - 1\\) = 128"),
    (dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=5), "must be a multiple of"),
])
def test_boft_refusals_change_nothing(kw, match):
    model = build("llama")
    with pytest.raises(ConfigError, match=match):
        add_adapter(model, BOFTConfig(target_modules=["q_proj"], **kw))
    assert list_adapters(model) == {} and not list(adapter_layers(model))
    with pytest.raises(ConfigError, match="is a Conv1D, which BOFT does not support yet"):
        add_adapter(build("gpt2"), BOFTConfig(target_modules=["c_attn"]))


def test_boft_on_quantized_base():
    """Rotations and scales train over frozen 4-bit codes; merge is refused until dequantized."""
    from tuneforge import dequantize_model, quantize_model

    model = quantize_model(build("llama"), compute_dtype="float32")
    add_adapter(model, BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"],
                                  init_weights=False))
    assert {type(m).__name__ for _, m in adapter_layers(model)} == {"BOFTQuantLinear"}
    train(model, "llama", steps=1)
    quantized = evaluate(model, "llama")
    with pytest.raises(ConfigError, match="cannot merge into .*q_proj: its base weight is quantized"):
        merge_adapters(model)
    dequantize_model(model)
    assert (evaluate(model, "llama") - quantized).abs().max().item() <= 1e-4
    merge_adapters(model)
    assert (evaluate(model, "llama") - quantized).abs().max().item() <= 1e-4


def test_boft_config_is_exported():
    assert tuneforge.BOFTConfig is BOFTConfig
