"""Several adapters at once, deletion, and the errors a user sees for bad input."""

import json

import pytest
import torch
from adapter_testkit import logits, make_model, tokens, train_steps
from peft import PeftModel
from safetensors.torch import load_file, save_file

from tuneforge.adapters import (
    LoraConfig,
    LoraLayer,
    active_adapters,
    add_adapter,
    delete_adapter,
    list_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapters,
)
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5


def _two_adapters():
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    cfg_b = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], init_lora_weights=False)
    add_adapter(model, cfg_b, "b")
    return model


def test_two_active_adapters_sum_and_match_peft(tmp_path):
    model = _two_adapters()
    assert active_adapters(model) == ["b"] and sorted(list_adapters(model)) == ["a", "b"]
    ids = tokens()
    base = logits(make_model("llama"), ids)
    only_b = logits(model, ids)
    set_active_adapters(model, "a")
    only_a = logits(model, ids)
    set_active_adapters(model, ["a", "b"])
    both = logits(model, ids)
    # v_proj carries both adapters: its output is base + delta_a + delta_b
    v = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        expect = v.weight @ x.T
        for n in ("a", "b"):
            expect += v.lora_scaling[n] * (v.lora_B[n] @ (v.lora_A[n] @ x.T))
        assert (v(x) - expect.T).abs().max().item() <= TOL
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)
    assert not torch.allclose(only_a, base)

    save_adapter(model, tmp_path / "a", name="a")
    save_adapter(model, tmp_path / "b", name="b")
    theirs = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.base_model.set_adapter(["a", "b"])
    assert (logits(theirs.eval(), ids) - both).abs().max().item() <= TOL


def test_only_active_adapters_train():
    model = _two_adapters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    set_active_adapters(model, ["a", "b"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".a") for n in trainable) and any(n.endswith(".b") for n in trainable)
    train_steps(model, steps=1)


def test_delete_adapter():
    model = _two_adapters()
    ids = tokens()
    set_active_adapters(model, "a")
    only_a = logits(model, ids)
    set_active_adapters(model, ["a", "b"])
    delete_adapter(model, "b")
    assert active_adapters(model) == ["a"] and list(list_adapters(model)) == ["a"]
    assert torch.equal(logits(model, ids), only_a)
    assert not any(k.endswith(".b") for k in model.state_dict())
    # down_proj only had "b": it is a plain Linear again
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    delete_adapter(model, "a")
    assert list(model.state_dict()) == list(make_model("llama").state_dict())
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.equal(logits(model, ids), logits(make_model("llama"), ids))


def test_delete_merged_adapter_unmerges_it():
    model = _two_adapters()
    ids = tokens()
    set_active_adapters(model, ["a", "b"])
    merge_adapters(model)
    with pytest.raises(ConfigError, match="unmerge"):
        set_active_adapters(model, "a")
    delete_adapter(model, "b")
    delete_adapter(model, "a")
    assert (logits(model, ids) - logits(make_model("llama"), ids)).abs().max().item() <= TOL


# ---- errors -----------------------------------------------------------------------------------
def test_no_matching_target_names_targets_and_modules():
    with pytest.raises(ConfigError) as e:
        add_adapter(make_model("llama"), LoraConfig(target_modules=["query", "value"]))
    msg = str(e.value)
    assert "query" in msg and "q_proj" in msg and "lm_head" in msg
    with pytest.raises(ConfigError, match="layers_to_transform"):
        add_adapter(make_model("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ConfigError, match="target_modules is not set"):
        add_adapter(make_model("llama"), LoraConfig())


def test_unsupported_target_type():
    with pytest.raises(ConfigError, match="LlamaMLP.*not support"):
        add_adapter(make_model("llama"), LoraConfig(target_modules=["mlp"]))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-2), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(r=True), "r must be a positive integer"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init_lora_weights="loftq"), "not supported yet"),
        (dict(target_modules=["q_proj", ""]), "non-empty"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform"),
        (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(layers_to_transform=[-1]), "layers_to_transform"),
    ],
)
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kw)


def test_bad_adapter_names_and_duplicates():
    model = make_model("llama")
    with pytest.raises(ConfigError, match="adapter name"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), "a.b")
    add_adapter(model, LoraConfig(target_modules=["q_proj"]), "x")
    with pytest.raises(ConfigError, match="already exists"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), "x")
    with pytest.raises(ConfigError, match="unknown adapter"):
        set_active_adapters(model, ["x", "nope"])
    with pytest.raises(ConfigError, match="no adapter named"):
        save_adapter(model, "/nonexistent/never", name="nope")


@pytest.fixture
def saved(tmp_path):
    model = add_adapter(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return save_adapter(model, tmp_path / "a")


def test_missing_files(tmp_path, saved):
    with pytest.raises(ModelError, match="does not exist"):
        load_adapter(make_model("llama"), tmp_path / "nowhere")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        load_adapter(make_model("llama"), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_adapter(make_model("llama"), saved)


def test_wrong_shape_names_key_and_shapes(saved):
    f = saved / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    sd[key] = torch.zeros(4, 48)
    save_file(sd, str(f))
    model = make_model("llama")
    with pytest.raises(ModelError) as e:
        load_adapter(model, saved)
    msg = str(e.value)
    assert key in msg and "(4, 48)" in msg and "(4, 64)" in msg
    # a failed load leaves the model as it was
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert list_adapters(model) == {}


def test_unmatched_and_missing_keys(saved):
    f = saved / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd["base_model.model.model.layers.0.mlp.nothing.lora_A.weight"] = torch.zeros(4, 64)
    save_file(sd, str(f))
    with pytest.raises(ModelError, match="match no module.*mlp.nothing"):
        load_adapter(make_model("llama"), saved)
    del sd["base_model.model.model.layers.0.mlp.nothing.lora_A.weight"]
    del sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    save_file(sd, str(f))
    with pytest.raises(ModelError, match="missing.*q_proj.lora_B"):
        load_adapter(make_model("llama"), saved)


def test_config_fields(saved, recwarn):
    cfg_file = saved / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "lora_bias": True}))  # use_dora is supported now (test_dora.py)
    with pytest.raises(ModelError, match="lora_bias=True is not supported yet"):
        load_adapter(make_model("llama"), saved)
    cfg_file.write_text(json.dumps({**raw, "peft_type": "IA3"}))
    with pytest.raises(ModelError, match="IA3"):
        load_adapter(make_model("llama"), saved)
    cfg_file.write_text(json.dumps({**raw, "r": 0}))
    with pytest.raises(ModelError, match="r must be a positive integer"):
        load_adapter(make_model("llama"), saved)
    cfg_file.write_text(json.dumps({**raw, "future_field": 3, "eva_config": None, "use_dora": False}))
    with pytest.warns(UserWarning, match="future_field"):
        load_adapter(make_model("llama"), saved)


def test_adapter_for_another_model(saved):
    with pytest.raises(ModelError, match="cannot be added to GPT2LMHeadModel"):
        load_adapter(make_model("gpt2"), saved)


def test_merged_adapters_block_add_and_modules_to_save_conflicts():
    model = _two_adapters()
    merge_adapters(model)
    with pytest.raises(ConfigError, match="unmerge"):
        add_adapter(model, LoraConfig(target_modules=["k_proj"]), "c")

    model = make_model("llama")
    add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "a")
    add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "b")
    with pytest.raises(ConfigError, match="lm_head"):
        set_active_adapters(model, ["a", "b"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        add_adapter(model, LoraConfig(target_modules=["lm_head"]), "c")
    with pytest.raises(ConfigError, match="matched no module"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]), "d")


def test_tied_weights_warn():
    model = make_model("llama", tie_word_embeddings=True)
    with pytest.warns(UserWarning, match="tied"):
        add_adapter(model, LoraConfig(target_modules=["lm_head"]))


def test_init_that_changes_base_is_refused_on_load(saved):
    cfg_file = saved / "adapter_config.json"
    raw = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**raw, "init_lora_weights": "loftq"}))
    with pytest.raises(ModelError, match="loftq.*not supported yet"):
        load_adapter(make_model("llama"), saved)
    # 'pissa' / 'olora' files load by redoing the init (test_pissa_olora.py); the randomised SVD cannot be redone
    cfg_file.write_text(json.dumps({**raw, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(ModelError, match="pissa_niter_4.*randomised SVD"):
        load_adapter(make_model("llama"), saved)
