"""combine_adapters against peft's add_weighted_adapter: same sources -> same combined adapter outputs."""

import pytest
import torch
from adapter_testkit import logits, make_model, tokens
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from torch import nn

from tuneforge.adapters import (
    LoraConfig,
    active_adapters,
    add_adapter,
    combine_adapters,
    disable_adapters,
    list_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
)
from tuneforge.adapters.core import lora_layers
from tuneforge.adapters.peft_format import adapter_state_dict
from tuneforge.errors import ConfigError

TOL = 1e-5
SEED = 1234

# x and y overlap on one module type only, so some modules carry one source and some both
LLAMA = (
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"], init_lora_weights=False),
)
LLAMA_RANKS = (LLAMA[0], {**LLAMA[1], "r": 2})  # different ranks, for cat / svd
GPT2 = (
    dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False, fan_in_fan_out=True),
    dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True),
)


def _pair(kind, cfg_a, cfg_b):
    """Ours and peft's model with the same random adapters x and y."""
    build = (lambda: make_model(kind)) if isinstance(kind, str) else kind
    ours = build()
    add_adapter(ours, LoraConfig(**cfg_a), "x")
    add_adapter(ours, LoraConfig(**cfg_b), "y")
    theirs = get_peft_model(build(), PeftLoraConfig(**cfg_a), adapter_name="x")
    theirs.add_adapter("y", PeftLoraConfig(**cfg_b))
    for name in ("x", "y"):  # through peft's file layout, so every layer type copies the same way
        set_peft_model_state_dict(theirs, adapter_state_dict(ours, name), adapter_name=name)
    return ours, theirs.eval()


def _peft_combine(theirs, *args, **kwargs):
    # reseed after peft has created the new adapter's (overwritten) tensors, so that DARE's draws
    # start from the same generator state as ours (which leaves the generator alone until then)
    inner = theirs.base_model
    inject = inner.inject_adapter

    def inject_then_seed(*a, **k):
        out = inject(*a, **k)
        torch.manual_seed(SEED)
        return out

    inner.inject_adapter = inject_then_seed
    try:
        inner.add_weighted_adapter(*args, **kwargs)
    finally:
        del inner.inject_adapter


def _compare(kind, cfgs, method, weights=(0.7, -0.4), ids=None, **kw):
    ours, theirs = _pair(kind, *cfgs)
    _peft_combine(theirs, ["x", "y"], list(weights), "xy", combination_type=method, **kw)
    torch.manual_seed(SEED)
    combine_adapters(ours, ["x", "y"], list(weights), "xy", method=method, **kw)
    assert active_adapters(ours) == ["y"], "combining must not change the active adapters"
    assert not any(p.requires_grad for n, p in ours.named_parameters() if n.endswith(".xy"))
    theirs.base_model.set_adapter("xy")
    set_active_adapters(ours, "xy")
    if ids is None:
        ids = tokens()
    with torch.no_grad():
        got, want = ours(ids), theirs(ids)
    if not torch.is_tensor(got):
        got, want = got.logits, want.logits
    with disable_adapters(ours), torch.no_grad():
        base = ours(ids)
    assert not torch.allclose(got, base if torch.is_tensor(base) else base.logits)
    assert (got - want).abs().max().item() <= TOL
    return ours, got


METHODS = [
    ("linear", LLAMA, {}),
    ("cat", LLAMA_RANKS, {}),
    ("svd", LLAMA_RANKS, {}),
    ("svd", LLAMA_RANKS, dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties", LLAMA, dict(density=0.5)),
    ("ties", LLAMA, dict(density=0.3, majority_sign_method="frequency")),
    ("magnitude_prune", LLAMA, dict(density=0.6)),
    ("ties_svd", LLAMA_RANKS, dict(density=0.5)),
    ("magnitude_prune_svd", LLAMA_RANKS, dict(density=0.5, svd_rank=2)),
    # DARE draws random masks: same seed and same draw order as peft -> same adapter
    ("dare_linear", LLAMA, dict(density=0.5)),
    ("dare_ties", LLAMA, dict(density=0.7, majority_sign_method="frequency")),
    ("dare_linear_svd", LLAMA_RANKS, dict(density=0.5)),
    ("dare_ties_svd", LLAMA_RANKS, dict(density=0.5)),
]


@pytest.mark.parametrize("method,cfgs,kw", METHODS, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(METHODS)])
def test_matches_peft(method, cfgs, kw):
    _compare("llama", cfgs, method, **kw)


@pytest.mark.parametrize("method,kw", [("linear", {}), ("cat", {}), ("svd", {}), ("ties", dict(density=0.5))])
def test_matches_peft_gpt2_conv1d(method, kw):
    _compare("gpt2", GPT2, method, **kw)


EMBEDDING = (
    dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False),
    dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False),
)


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties"])
def test_matches_peft_embedding(method):
    cfgs = (EMBEDDING[0], {**EMBEDDING[1], "r": 4}) if method in ("linear", "ties") else EMBEDDING
    _compare("llama", cfgs, method, **(dict(density=0.5) if method == "ties" else {}))


class TinyCNN(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.ReLU(), nn.Conv2d(6, 4, 3))


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "dare_ties"])
def test_matches_peft_conv2d(method):
    cx = dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    cy = dict(r=2 if method in ("linear", "dare_ties") else 3, target_modules=["2", "4"], init_lora_weights=False)
    ids = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    _compare(TinyCNN, (cx, cy), method, ids=ids, **(dict(density=0.6) if method == "dare_ties" else {}))


def test_cat_is_the_exact_weighted_sum():
    ours, _ = _compare("llama", LLAMA_RANKS, "cat", weights=(0.5, 2.0))
    for path, m in lora_layers(ours, "xy"):
        want = sum(w * m.delta_weight(a) for a, w in (("x", 0.5), ("y", 2.0)) if a in m.lora_A)
        assert m.lora_r["xy"] == 6 and m.lora_scaling["xy"] == 1.0
        assert (m.delta_weight("xy") - want).abs().max().item() <= 1e-6, path


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_saved_combination_loads_in_peft_and_back(tmp_path, method):
    ours, got = _compare("llama", LLAMA if method == "linear" else LLAMA_RANKS, method)
    save_adapter(ours, tmp_path / "xy", name="xy")
    theirs = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "xy")).eval()
    ids = tokens()
    assert (logits(theirs, ids) - got).abs().max().item() <= TOL
    again = load_adapter(make_model("llama"), tmp_path / "xy")
    assert (logits(again, ids) - got).abs().max().item() <= TOL


def test_single_source_gives_back_the_source_even_with_rslora(tmp_path):
    # peft 0.21.2 copies use_rslora into the new config and scales the result by sqrt(r); we do not
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                  use_rslora=True), "x")  # fmt: skip
    ids = tokens()
    want = logits(model, ids)
    combine_adapters(model, ["x"], [1.0], "a1", method="svd")  # one source: always linear (as peft)
    assert list_adapters(model)["a1"].use_rslora is False
    set_active_adapters(model, "a1")
    assert (logits(model, ids) - want).abs().max().item() <= TOL
    save_adapter(model, tmp_path / "a1", name="a1")
    theirs = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "a1")).eval()
    assert (logits(theirs, ids) - want).abs().max().item() <= TOL


def test_rank_pattern_sources_keep_their_ranks(tmp_path):
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, init_lora_weights=False)
    model = make_model("llama")
    add_adapter(model, LoraConfig(**cfg), "x")
    add_adapter(model, LoraConfig(**{**cfg, "lora_alpha": 3}), "y")
    combine_adapters(model, ["x", "y"], [0.5, 0.5], "xy")
    assert {m.lora_r["xy"] for p, m in lora_layers(model, "xy") if p.endswith("v_proj")} == {2}
    set_active_adapters(model, "xy")
    ids = tokens()
    want = logits(model, ids)
    save_adapter(model, tmp_path / "xy", name="xy")
    theirs = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "xy")).eval()
    assert (logits(theirs, ids) - want).abs().max().item() <= TOL


def test_modules_to_save_as_peft(tmp_path):
    cfg_a = dict(LLAMA[0], modules_to_save=["lm_head"])
    ours, theirs = _pair("llama", cfg_a, LLAMA[1])
    noise = torch.randn(ours.lm_head.weight.shape) * 0.5
    with torch.no_grad():  # a trained head: peft does not carry it into the combination
        ours.lm_head.modules_to_save["x"].weight.add_(noise)
        theirs.base_model.model.lm_head.modules_to_save["x"].weight.add_(noise)
    theirs.add_weighted_adapter(["x", "y"], [0.6, 0.4], "xy", combination_type="cat")
    with pytest.warns(UserWarning, match="lm_head.*not combined"):
        combine_adapters(ours, ["x", "y"], [0.6, 0.4], "xy", method="cat")
    assert torch.equal(ours.lm_head.modules_to_save["xy"].weight, make_model("llama").lm_head.weight)
    theirs.base_model.set_adapter("xy")
    set_active_adapters(ours, "xy")
    ids = tokens()
    got = logits(ours, ids)
    assert (got - logits(theirs, ids)).abs().max().item() <= TOL
    save_adapter(ours, tmp_path / "xy", name="xy")
    loaded = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "xy")).eval()
    assert (logits(loaded, ids) - got).abs().max().item() <= TOL


def test_dare_prunes_and_rescales():
    model = make_model("llama")
    add_adapter(model, LoraConfig(**LLAMA[0]), "x")
    combine_adapters(model, ["x"], [1.0], "same")  # baseline: one source is the source itself
    add_adapter(model, LoraConfig(**LLAMA[0]), "z")
    with torch.no_grad():
        for _, m in lora_layers(model, "z"):
            m.lora_A["z"].copy_(m.lora_A["x"])
            m.lora_B["z"].copy_(m.lora_B["x"])
    combine_adapters(model, ["x", "z"], [1.0, 1.0], "d", method="dare_linear", density=0.25)
    q = model.model.layers[0].self_attn.q_proj
    kept = q.lora_A["d"] != 0
    assert 0.1 < kept.float().mean().item() < 0.45  # about half survive: each source keeps 25%
    # a surviving entry is a sum of rescaled copies: (1 or 2) * sqrt(scaling) * A / 0.25
    ratio = (q.lora_A["d"][kept] / (q.lora_A["x"][kept] * q.lora_scaling["x"] ** 0.5 / 0.25)).round()
    assert set(ratio.unique().tolist()) <= {1.0, 2.0}


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((["x", "nope"], [1, 1], "c"), {}, "unknown adapter.*nope"),
        (("x", [1], "c"), {}, "list of adapter names"),
        ((["x", "x"], [1, 1], "c"), {}, "more than once"),
        ((["x", "y"], [1.0], "c"), {}, "1 weights for 2 adapters"),
        ((["x", "y"], [1.0, float("nan")], "c"), {}, "finite"),
        ((["x", "y"], [1, 1], "y"), {}, "already exists"),
        ((["x", "y"], [1, 1], "c"), dict(method="average"), "method='average' is not one of"),
        ((["x", "y"], [1, 1], "c"), dict(method="ties"), "needs density"),
        ((["x", "y"], [1, 1], "c"), dict(method="dare_linear", density=1.5), r"density must be .*\(0, 1\]"),
        ((["x", "y"], [1, 1], "c"), dict(method="ties", density=0.0), r"density must be"),
        ((["x", "y"], [1, 1], "c"), dict(density=0.5), "only used by the pruning"),
        ((["x", "y"], [1, 1], "c"), dict(method="ties", density=0.5, majority_sign_method="x"), "majority_sign"),
        ((["x", "y"], [1, 1], "c"), dict(svd_rank=2), "only apply to the svd"),
        ((["x", "y"], [1, 1], "c"), dict(method="svd", svd_rank=0), "svd_rank must be"),
        ((["x", "y2"], [1, 1], "c"), {}, r"equal ranks.*'x': 4, 'y2': 2.*cat"),
    ],
)
def test_errors(args, kw, match):
    model = make_model("llama")
    add_adapter(model, LoraConfig(**LLAMA[0]), "x")
    add_adapter(model, LoraConfig(**LLAMA[1]), "y")
    add_adapter(model, LoraConfig(**LLAMA_RANKS[1]), "y2")
    before = sorted(list_adapters(model))
    with pytest.raises(ConfigError, match=match):
        combine_adapters(model, *args, **kw)
    assert sorted(list_adapters(model)) == before


def test_refuses_dora_merged_and_shared_modules_to_save():
    model = make_model("llama")
    add_adapter(model, LoraConfig(**LLAMA[0]), "x")
    add_adapter(model, LoraConfig(**LLAMA[1]), "y")
    merge_adapters(model)
    with pytest.raises(ConfigError, match="merged.*unmerge"):
        combine_adapters(model, ["x", "y"], [1, 1], "c")

    model = make_model("llama")
    add_adapter(model, LoraConfig(**LLAMA[0], modules_to_save=["lm_head"]), "x")
    add_adapter(model, LoraConfig(**LLAMA[1], modules_to_save=["lm_head"]), "y")
    with pytest.raises(ConfigError, match="own copy of lm_head"):
        combine_adapters(model, ["x", "y"], [1, 1], "c")

    try:
        add_adapter(model, LoraConfig(**{**LLAMA[0], "init_lora_weights": "pissa"}), "p")
    except ConfigError:
        pass  # PiSSA not available in this build
    else:
        with pytest.raises(ConfigError, match="initialised from the base weights.*pissa"):
            combine_adapters(model, ["x", "p"], [1, 1], "c")
    try:
        dora = LoraConfig(**LLAMA[0], use_dora=True)
        add_adapter(model, dora, "d")
    except ConfigError:
        pytest.skip("DoRA is not available in this build")
    with pytest.raises(ConfigError, match="DoRA"):
        combine_adapters(model, ["x", "d"], [1, 1], "c")
