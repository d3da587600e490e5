"""route_adapters: each sample of a batch runs its own adapter, in forward and in generate."""

import pytest
import torch
from adapter_testkit import copy_ours_to_peft, logits, make_model, tokens
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from tuneforge.adapters import (
    LoraConfig,
    active_adapters,
    add_adapter,
    disable_adapters,
    merge_adapters,
    route_adapters,
    set_active_adapters,
)
from tuneforge.adapters.core import lora_layers, saved_modules
from tuneforge.errors import ConfigError

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(shares a weight|ensure_weight_tying).*")
NAMES = ["x", "__base__", "y", "x"]
TARGETS = {  # y misses one of x's modules, so some layers carry only one of them
    "llama": (["q_proj", "v_proj"], ["v_proj", "down_proj"]),
    "gpt2": (["c_attn", "c_proj"], ["c_attn", "c_fc"]),
}


def _cfgs(kind, mts=False):
    tx, ty = TARGETS[kind]
    extra = dict(modules_to_save=["lm_head"]) if mts else {}
    return (
        dict(r=4, lora_alpha=8, target_modules=tx, init_lora_weights=False, **extra),
        dict(r=2, lora_alpha=8, target_modules=ty, init_lora_weights=False, **extra),
    )


def _model(kind="llama", mts=False):
    model = make_model(kind)
    cx, cy = _cfgs(kind, mts)
    add_adapter(model, LoraConfig(**cx), "x")
    add_adapter(model, LoraConfig(**cy), "y")
    if mts:  # distinct trained heads (random: a constant shift would not change softmax or argmax)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name in ("x", "y"):
                w = model.lm_head.modules_to_save[name].weight
                w.add_(torch.randn(w.shape, generator=g) * 0.5)
    return model


def _single(model, name, ids, **gen):
    """The same rows with one adapter active (or none), the reference for routing."""
    def run():
        if gen:
            return model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        return logits(model, ids)

    if name == "__base__":
        with disable_adapters(model):
            return run()
    before = active_adapters(model)
    set_active_adapters(model, name)
    try:
        return run()
    finally:
        set_active_adapters(model, before)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mts", [False, True], ids=["lora", "modules_to_save"])
def test_forward_matches_single_runs(kind, mts):
    model = _model(kind, mts)
    ids = tokens(batch=4)
    before = active_adapters(model)
    with route_adapters(model, NAMES):
        out = logits(model, ids)
    assert active_adapters(model) == before
    for i, name in enumerate(NAMES):
        assert (out[i] - _single(model, name, ids[i : i + 1])[0]).abs().max().item() <= TOL, (i, name)
    base = logits(make_model(kind), ids)
    assert (out[1] - base[1]).abs().max().item() <= TOL
    assert not torch.allclose(out[0], base[0]) and not torch.allclose(out[2], base[2])
    # the routing state is gone afterwards: a plain forward runs the active adapter again
    assert all("_lora_route" not in m.__dict__ for _, m in lora_layers(model))
    assert all("_mts_route" not in m.__dict__ for _, m in saved_modules(model))
    assert torch.equal(logits(model, ids), _single(model, before[0], ids))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mts", [False, True], ids=["lora", "modules_to_save"])
def test_matches_peft_mixed_batch(kind, mts):
    model = _model(kind, mts)
    cx, cy = _cfgs(kind, mts)
    theirs = get_peft_model(make_model(kind), PeftLoraConfig(**cx), adapter_name="x")
    theirs.add_adapter("y", PeftLoraConfig(**cy))
    copy_ours_to_peft(model, theirs, "x", "x")
    copy_ours_to_peft(model, theirs, "y", "y")
    if mts:
        with torch.no_grad():
            for name in ("x", "y"):
                theirs.base_model.model.lm_head.modules_to_save[name].weight.copy_(
                    model.lm_head.modules_to_save[name].weight
                )
    theirs.eval()
    ids = tokens(batch=4)
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=NAMES).logits
    with route_adapters(model, NAMES):
        got = logits(model, ids)
    assert (got - want).abs().max().item() <= TOL


def test_any_loaded_adapter_and_one_name_for_all_rows():
    model = _model()
    set_active_adapters(model, "y")
    ids = tokens(batch=2)
    with route_adapters(model, ["x", "x"]):  # x is loaded but not active
        out = logits(model, ids)
    assert (out - _single(model, "x", ids)).abs().max().item() <= TOL


def test_other_layer_types_and_dora():
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False), "x")
    dora = LoraConfig(r=4, target_modules=["v_proj", "o_proj"], use_dora=True, init_lora_weights=False)
    add_adapter(model, dora, "y")
    with torch.no_grad():  # a magnitude away from ||W + sBA|| so that DoRA differs from plain LoRA
        for _, m in lora_layers(model, "y"):
            m.lora_magnitude_vector["y"].mul_(1.5)
    ids = tokens(batch=3)
    names = ["y", "x", "__base__"]
    with route_adapters(model, names):
        out = logits(model, ids)
    for i, name in enumerate(names):
        assert (out[i] - _single(model, name, ids[i : i + 1])[0]).abs().max().item() <= TOL, name


def test_gradients_in_eval_mode_are_per_sample():
    model = _model()
    set_active_adapters(model, "x")  # x's tensors require grad
    ids = tokens(batch=2)
    with route_adapters(model, ["x", "y"]):
        model(input_ids=ids).logits[0].square().mean().backward()
    routed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model(input_ids=ids[:1]).logits[0].square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (routed[n] - p.grad).abs().max().item() <= 1e-6, n


# ---- generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "gen",
    [dict(), dict(num_beams=2), dict(num_beams=3, num_return_sequences=2)],
    ids=["greedy", "beams", "beams-multi"],
)
def test_generate_matches_single_runs(kind, gen):
    model = _model(kind, mts=True)
    # min_new_tokens: no sequence stops early (GPT-2's eos is a common token here), so lengths agree
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, **gen)
    names = ["x", "__base__", "y"]
    ids = tokens(batch=3, length=6)  # equal lengths: no padding
    with route_adapters(model, names):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    k = gen.get("num_return_sequences", 1)
    assert out.shape[0] == 3 * k
    for i, name in enumerate(names):
        want = _single(model, name, ids[i : i + 1], **gen)
        assert torch.equal(out[i * k : (i + 1) * k], want), (i, name)


def test_sampling_with_several_sequences_routes_each_copy():
    model = _model()
    ids = tokens(batch=2, length=6)
    gen = dict(max_new_tokens=4, do_sample=True, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(0)
    with route_adapters(model, ["x", "y"]):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    assert out.shape == (6, 10)
    # re-score the sampled sequences: each copy must have run its sample's adapter
    with route_adapters(model, ["x"] * 3 + ["y"] * 3):
        routed = logits(model, out)
    for i, name in enumerate(["x"] * 3 + ["y"] * 3):
        assert (routed[i] - _single(model, name, out[i : i + 1])[0]).abs().max().item() <= TOL


# ---- refusals -----------------------------------------------------------------------------------
def test_batch_size_that_does_not_fit():
    model = _model()
    with route_adapters(model, ["x", "y"]), pytest.raises(ConfigError, match=r"2 adapter names.*batch of 3 rows"):
        logits(model, tokens(batch=3))


@pytest.mark.parametrize(
    "names,match",
    [
        ([], "empty list"),
        ("x", "one adapter name per sample"),
        (["x", "nope"], r"unknown adapter.*nope"),
    ],
)
def test_bad_names(names, match):
    model = _model()
    with pytest.raises(ConfigError, match=match), route_adapters(model, names):
        pass


def test_refused_states_and_state_restored():
    model = _model()
    ids = tokens(batch=2)
    plain = logits(model, ids)

    model.train()
    with pytest.raises(ConfigError, match="eval mode"), route_adapters(model, ["x", "y"]):
        pass
    model.eval()
    with route_adapters(model, ["x", "y"]):
        model.train()  # switched inside the with-block: refused at the next forward
        with pytest.raises(ConfigError, match="eval mode"):
            model(input_ids=ids)
        model.eval()
        with pytest.raises(ConfigError, match="nesting"), route_adapters(model, ["x", "y"]):
            pass
    with disable_adapters(model):
        with pytest.raises(ConfigError, match="disable_adapters"), route_adapters(model, ["x", "y"]):
            pass

    with pytest.raises(RuntimeError, match="boom"), route_adapters(model, ["x", "y"]):
        raise RuntimeError("boom")
    assert all("_lora_route" not in m.__dict__ for _, m in lora_layers(model))
    assert torch.equal(logits(model, ids), plain)

    set_active_adapters(model, ["x", "y"])
    merge_adapters(model)
    with pytest.raises(ConfigError, match="merged.*unmerge"), route_adapters(model, ["x", "y"]):
        pass
