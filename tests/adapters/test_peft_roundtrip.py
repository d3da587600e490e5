"""Files cross the peft boundary both ways: tuneforge -> peft and peft -> tuneforge give equal logits."""

import json

import pytest
import torch
from adapter_testkit import logits, make_model, tokens, train_steps
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter

TOL = 1e-5

CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    ("llama", dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(r=4, target_modules=r".*\.layers\.1\..*_proj", rank_pattern={"o_proj": 2},
                   alpha_pattern={"q_proj": 3})),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], bias="lora_only")),
    ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all")),
    ("gpt2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
]  # fmt: skip


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_tuneforge_file_loads_in_peft(tmp_path, kind, kw):
    model = make_model(kind)
    add_adapter(model, LoraConfig(**kw))
    train_steps(model, steps=3, opt="adamw")
    ids = tokens()
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(make_model(kind), ids)), "training changed nothing"
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")

    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in sd)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "tiny"

    theirs = PeftModel.from_pretrained(make_model(kind), str(tmp_path / "a")).eval()
    assert (logits(theirs, ids) - ours).abs().max().item() <= TOL


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_peft_file_loads_in_tuneforge(tmp_path, kind, kw):
    peft_model = get_peft_model(make_model(kind), PeftLoraConfig(**kw))
    train_steps(peft_model, steps=3, opt="sgd", lr=0.5)
    ids = tokens()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "p"))

    model = load_adapter(make_model(kind), tmp_path / "p")
    got = logits(model, ids)
    assert not torch.allclose(got, logits(make_model(kind), ids))
    assert (got - expected).abs().max().item() <= TOL
    # loaded for inference: nothing trainable
    assert not any(p.requires_grad for p in model.parameters())


def test_load_is_trainable_and_resave_is_identical(tmp_path):
    peft_model = get_peft_model(make_model("llama"), PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train_steps(peft_model, steps=2)
    peft_model.save_pretrained(str(tmp_path / "p"))

    model = load_adapter(make_model("llama"), tmp_path / "p", is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default" in n or ".lora_B.default" in n for n in trainable)
    save_adapter(model, tmp_path / "again")
    a = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_into_existing_adapter_restores_weights(tmp_path):
    model = make_model("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    train_steps(model, steps=2)
    ids = tokens()
    trained = logits(model, ids)
    save_adapter(model, tmp_path / "ckpt")
    train_steps(model, steps=2)
    assert not torch.allclose(logits(model, ids), trained)
    load_adapter(model, tmp_path / "ckpt", is_trainable=True)  # resume: same adapter name, weights replaced
    assert torch.equal(logits(model, ids), trained)


def test_bf16_base_keeps_fp32_adapter_and_matches_peft(tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    ids = tokens()
    ours = logits(model, ids)
    assert ours.dtype == torch.bfloat16
    save_adapter(model, tmp_path / "a")
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).values())
    theirs = PeftModel.from_pretrained(make_model("llama").to(torch.bfloat16), str(tmp_path / "a")).eval()
    assert torch.equal(logits(theirs, ids), ours)


def test_bf16_base_modules_to_save_copy_is_fp32(tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.modules_to_save["default"].weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    train_steps(model, steps=1)
    ids = tokens()
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16
    save_adapter(model, tmp_path / "a")
    again = load_adapter(make_model("llama").to(torch.bfloat16), tmp_path / "a")
    assert torch.equal(logits(again, ids), out)
