"""PiSSA / OLoRA: the init equals peft's, the adapter starts as a no-op, the trained adapter converts
to a plain LoRA for the original weights (read by tuneforge and peft), and files load both ways."""

import copy
import json

import pytest
import torch
from adapter_testkit import copy_ours_to_peft, logits, make_model, peft_lora_modules, tokens, train_steps
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from tuneforge.adapters import LoraConfig, add_adapter, delete_adapter, load_adapter, save_adapter, unload
from tuneforge.adapters.convert import save_initial_adapter
from tuneforge.adapters.core import lora_layers
from tuneforge.adapters.inits import given_initial_state, initial_state
from tuneforge.errors import ConfigError, ModelError

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:.*(Rank-Stabilized LoRA|PiSSA changes the base weights)")

CASES = [
    ("llama", "pissa", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])),
    ("llama", "olora", dict(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj", "o_proj"])),
    ("llama", "pissa_niter_3", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("llama", "pissa", dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                            rank_pattern={"o_proj": 2})),
    ("qwen2", "olora", dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"], bias="lora_only")),
    ("gpt2", "pissa", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("gpt2", "pissa_niter_2", dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
]  # fmt: skip
IDS = [f"{k}-{i}-{init}" for i, (k, init, _) in enumerate(CASES)]


def _pair(kind, init, kw, seed=5):
    """Our model and peft's, each adapted from the same weights and the same RNG state."""
    ours = make_model(kind)
    torch.manual_seed(seed)
    add_adapter(ours, LoraConfig(init_lora_weights=init, **kw))
    theirs = make_model(kind)
    torch.manual_seed(seed)
    theirs = get_peft_model(theirs, PeftLoraConfig(init_lora_weights=init, **kw))
    return ours, theirs


@pytest.mark.parametrize("kind,init,kw", CASES, ids=IDS)
def test_init_equals_peft_and_is_a_no_op(kind, init, kw):
    ids = tokens()
    original = logits(make_model(kind), ids)
    ours, theirs = _pair(kind, init, kw)
    peft_layers = peft_lora_modules(theirs)
    layers = list(lora_layers(ours))
    assert layers
    for path, m in layers:
        t = peft_layers[path]
        A, B = m.lora_A["default"], m.lora_B["default"]
        tA, tB = t.lora_A["default"].weight, t.lora_B["default"].weight
        # SVD/QR signs are arbitrary in principle: compare what they define, B @ A and the residual
        assert ((B @ A) - (tB @ tA)).abs().max().item() <= TOL, path
        assert (m.weight - t.base_layer.weight).abs().max().item() <= TOL, path
        assert B.abs().max() > 0 and A.abs().max() > 0  # the adapter really holds part of W
    got = logits(ours, ids)
    assert (got - logits(theirs, ids)).abs().max().item() <= TOL
    assert (got - original).abs().max().item() <= TOL  # residual + s B A gives W back


def test_pissa_niter_with_a_seed_is_peft_exactly():
    ours, theirs = _pair("llama", "pissa_niter_2", dict(r=4, target_modules=["q_proj", "up_proj"]))
    peft_layers = peft_lora_modules(theirs)
    for path, m in lora_layers(ours):
        assert torch.equal(m.lora_A["default"], peft_layers[path].lora_A["default"].weight)
        assert torch.equal(m.weight, peft_layers[path].base_layer.weight)


def test_olora_on_conv1d_uses_the_out_in_layout():
    # peft's OLoRA fails on transformers' Conv1D (it decomposes the (in, out) matrix); ours transposes
    model, original = make_model("gpt2"), make_model("gpt2")
    ids = tokens()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights="olora"))
    assert (logits(model, ids) - logits(original, ids)).abs().max().item() <= TOL
    path, layer = next(iter(lora_layers(model)))
    W = original.get_submodule(path).weight.T  # (out, in)
    Q, R = torch.linalg.qr(W)
    assert torch.allclose(layer.lora_B["default"], Q[:, :4]) and torch.allclose(layer.lora_A["default"], R[:4])


def test_half_precision_base_keeps_peft_residual_and_fp32_adapter():
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    ours = make_model("llama").to(torch.bfloat16)
    add_adapter(ours, LoraConfig(init_lora_weights="pissa", **kw))
    theirs = get_peft_model(make_model("llama").to(torch.bfloat16), PeftLoraConfig(init_lora_weights="pissa", **kw))
    peft_layers = peft_lora_modules(theirs)
    for path, m in lora_layers(ours):
        t = peft_layers[path]
        assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, t.base_layer.weight)
        # peft rounds A/B through bf16 before upcasting them; ours keep the fp32 decomposition
        assert m.lora_A["default"].dtype == torch.float32
        torch.testing.assert_close(m.lora_A["default"], t.lora_A["default"].weight.float(), rtol=8e-3, atol=1e-6)


def test_refusals_name_the_problem():
    # peft refuses PiSSA/OLoRA on conv layers too (embeddings silently get their default init there)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ConfigError, match="Linear and Conv1D layers only, not Conv2d"):
        add_adapter(conv, LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="rank cannot exceed 64"):
        add_adapter(make_model("llama"), LoraConfig(r=80, target_modules=["q_proj"], init_lora_weights="olora"))
    with pytest.raises(ConfigError, match="N must be >= 1"):
        LoraConfig(init_lora_weights="pissa_niter_0")
    plain = make_model("llama")
    add_adapter(plain, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="only PiSSA / OLoRA adapters"):
        save_adapter(plain, "/nonexistent/never-written", convert_pissa=True)


def test_deleting_the_adapter_gives_the_weights_back():
    model, original = make_model("llama"), make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    train_steps(model, steps=2)
    delete_adapter(model, "default")
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name



def test_unload_gives_the_original_or_the_trained_weights():
    ids = tokens()
    original = make_model("llama")
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="olora"))
    train_steps(model, steps=2)
    trained = logits(model, ids)
    merged = unload(copy.deepcopy(model), merge=True)
    assert (logits(merged, ids) - trained).abs().max().item() <= TOL
    plain = unload(model, merge=False)  # the residual must not stay in the weights
    for (name, p), q in zip(plain.named_parameters(), original.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name


CONVERT = [
    ("llama", "pissa", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", "olora", dict(r=4, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"])),
    ("gpt2", "pissa", dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    ("llama", "pissa", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                            alpha_pattern={"q_proj": 3})),
    # an embedding gets the default init under PiSSA (as in peft): converted with zeros as (A0, B0)
    ("llama", "pissa", dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])),
    # DoRA: W_res + s B A == W + s B' A', so the trained magnitude carries over unchanged
    ("llama", "pissa", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True)),
]  # fmt: skip


@pytest.mark.parametrize("kind,init,kw", CONVERT, ids=[f"{k}-{i}-{init}" for i, (k, init, _) in enumerate(CONVERT)])
def test_converted_adapter_on_the_original_base_reproduces_training(tmp_path, kind, init, kw):
    model = make_model(kind)
    add_adapter(model, LoraConfig(init_lora_weights=init, **kw))
    train_steps(model, steps=3)
    ids = tokens()
    trained = logits(model, ids)
    assert (trained - logits(make_model(kind), ids)).abs().max().item() > 1e-3, "training changed nothing"
    save_adapter(model, tmp_path / "conv", convert_pissa=True)

    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    factor = 2**0.5 if kw.get("use_rslora") else 2
    assert cfg["r"] == 2 * kw["r"] and cfg["init_lora_weights"] is True
    assert abs(cfg["lora_alpha"] - kw["lora_alpha"] * factor) < 1e-9
    assert cfg["rank_pattern"] == {k: 2 * v for k, v in kw.get("rank_pattern", {}).items()}
    sd = load_file(str(tmp_path / "conv" / "adapter_model.safetensors"))
    for path, m in lora_layers(model):
        suffix = next(k for k, t in m.peft_tensors("default").items() if t is m.lora_A["default"])
        A = sd[f"base_model.model.{path}.{suffix}"]
        assert A.shape[0] == 2 * m.lora_r["default"] and torch.equal(A[: m.lora_r["default"]], m.lora_A["default"])

    ours = load_adapter(make_model(kind), tmp_path / "conv")
    assert (logits(ours, ids) - trained).abs().max().item() <= TOL
    theirs = PeftModel.from_pretrained(make_model(kind), str(tmp_path / "conv")).eval()
    assert (logits(theirs, ids) - trained).abs().max().item() <= TOL


def test_converted_file_equals_peft_conversion(tmp_path):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    ours, theirs = _pair("llama", "pissa", kw)
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe for the initial adapter
    theirs.save_pretrained(str(tmp_path / "init"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    train_steps(ours, steps=3)
    copy_ours_to_peft(ours, theirs)
    theirs.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    save_adapter(ours, tmp_path / "ours", convert_pissa=True)

    mine, ref = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert mine.keys() == ref.keys()
    for k in ref:
        assert (mine[k] - ref[k]).abs().max().item() <= 1e-6, k
    mine_cfg, ref_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert mine_cfg[key] == ref_cfg[key], key
    assert set(mine_cfg["target_modules"]) == set(ref_cfg["target_modules"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_files_load_both_ways_by_redoing_the_init(tmp_path, init):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    ids = tokens()
    model = make_model("llama")
    add_adapter(model, LoraConfig(init_lora_weights=init, **kw))
    train_steps(model, steps=3)
    trained = logits(model, ids)
    save_adapter(model, tmp_path / "raw")
    assert json.loads((tmp_path / "raw" / "adapter_config.json").read_text())["init_lora_weights"] == init
    # on the original base, both re-run the init (rebuilding the residual) and then take A and B
    assert (logits(load_adapter(make_model("llama"), tmp_path / "raw"), ids) - trained).abs().max().item() <= TOL
    theirs = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "raw")).eval()
    assert (logits(theirs, ids) - trained).abs().max().item() <= TOL

    peft_model = get_peft_model(make_model("llama"), PeftLoraConfig(init_lora_weights=init, **kw))
    train_steps(peft_model, steps=3, opt="sgd", lr=0.5)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "p"))
    loaded = load_adapter(make_model("llama"), tmp_path / "p")
    assert (logits(loaded, ids) - expected).abs().max().item() <= TOL
    # the reloaded adapter remembers its init, so it converts as well
    save_adapter(loaded, tmp_path / "p_conv", convert_pissa=True)
    assert (logits(load_adapter(make_model("llama"), tmp_path / "p_conv"), ids) - expected).abs().max() <= TOL


def test_randomised_pissa_file_is_refused(tmp_path):
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
    save_adapter(model, tmp_path / "raw")
    with pytest.raises(ModelError, match="randomised SVD.*load the converted adapter"):
        load_adapter(make_model("llama"), tmp_path / "raw")


def test_initial_adapter_file_is_the_untrained_model(tmp_path):
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    train_steps(model, steps=2)
    trained = logits(model, tokens())
    save_initial_adapter(model, tmp_path / "init")
    assert torch.equal(logits(model, tokens()), trained)  # the trained A/B are back in place
    ids = tokens()
    got = logits(load_adapter(make_model("llama"), tmp_path / "init"), ids)
    assert (got - logits(make_model("llama"), ids)).abs().max().item() <= TOL


def test_given_initial_state_rebuilds_the_randomised_residual_exactly():
    kw = dict(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa_niter_2")
    first = make_model("llama")
    torch.manual_seed(1)
    add_adapter(first, LoraConfig(**kw))
    state = initial_state(first, "default")
    assert len(state) == 2 * 2 * 2  # (A0, B0) for 2 modules x 2 layers
    again = make_model("llama")
    torch.manual_seed(2)  # another seed: a fresh randomised SVD would differ
    with given_initial_state(again, "default", state):
        add_adapter(again, LoraConfig(**kw))
    for (path, a), (_, b) in zip(lora_layers(first), lora_layers(again)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.lora_A["default"], b.lora_A["default"]), path


def test_a_refused_file_leaves_the_base_weights_untouched(tmp_path):
    from safetensors.torch import save_file

    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(str(weights))
    sd.pop(next(k for k in sd if "lora_B" in k))
    save_file(sd, str(weights))
    target, original = make_model("llama"), make_model("llama")
    with pytest.raises(ModelError, match="missing"):
        load_adapter(target, tmp_path / "a")  # PiSSA ran on the base before the file was found wanting
    for (name, p), q in zip(target.named_parameters(), original.parameters()):
        assert (p - q).abs().max().item() <= 1e-6, name
