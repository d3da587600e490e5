"""Quantized models on disk (save_quantized / load_quantized), QLoRA adapters as ordinary peft
adapters, and export of a model trained on a quantized base (merge of dequant(W) + BA)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from adapter_testkit import logits, make_model, tokens, train_steps
from safetensors.torch import load_file, save_file

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.errors import CheckpointError, ModelError
from tuneforge.quant import QuantLinear, dequantize_model, load_quantized, quantize_model, save_quantized

SETTINGS = {
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
    "fp4": dict(bits=4, quant_type="fp4", double_quant=False),
    "int8": dict(bits=8),
}


def quantized(tie: bool = False, setting: str = "nf4-dq", seed: int = 0):
    model = make_model("llama", seed=seed, tie_word_embeddings=tie)
    return quantize_model(model, compute_dtype="float32", **SETTINGS[setting])


# ---- save / load round trip ---------------------------------------------------------------------
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_gives_the_same_codes_and_logits(tmp_path, setting, tie):
    model = quantized(tie, setting)
    ids = tokens()
    save_quantized(model, tmp_path / "q")
    assert "quantization_config" not in json.loads((tmp_path / "q" / "tuneforge_config.json").read_text())
    loaded = load_quantized(tmp_path / "q")

    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    assert any(name.endswith("nested_absmax") for name in after) == (setting == "nf4-dq")
    quant = {p: m for p, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert quant.keys() == {p for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 14 and not any(p.startswith("lm_head") for p in quant)
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_the_private_format_is_no_hf_folder(tmp_path):
    """transformers must not take save_quantized's folder for a model of its own: with a config.json
    it would fill every quantized projection with random weights. It refuses the folder instead; a
    folder saved as format_version 1 (config.json, model.safetensors) still loads in tuneforge."""
    from transformers import AutoModelForCausalLM

    model = quantized()
    out = save_quantized(model, tmp_path / "q")
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    with pytest.raises((OSError, ValueError), match="config.json"):  # no model there, it says
        AutoModelForCausalLM.from_pretrained(out)
    (out / "tuneforge_config.json").rename(out / "config.json")
    (out / "tuneforge_quantized.safetensors").rename(out / "model.safetensors")
    meta = json.loads((out / "tuneforge_quantization.json").read_text())
    (out / "tuneforge_quantization.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert torch.equal(logits(load_quantized(out), tokens()), logits(model, tokens()))


def test_save_replaces_a_previous_model_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "q"
    save_quantized(quantized(seed=0), out)
    first = (out / "tuneforge_quantized.safetensors").read_bytes()

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized(seed=1), out)
    assert (out / "tuneforge_quantized.safetensors").read_bytes() == first  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no half-written folder left
    monkeypatch.undo()

    second = quantized(seed=1)
    save_quantized(second, out)
    assert torch.equal(logits(load_quantized(out), tokens()), logits(second, tokens()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_save_refuses_adapters_plain_models_and_foreign_folders(tmp_path):
    model = quantized()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ModelError, match="adapters"):
        save_quantized(model, tmp_path / "a")
    with pytest.raises(ModelError, match="no quantized layers"):
        save_quantized(make_model("llama"), tmp_path / "b")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="non-empty folder"):
        save_quantized(quantized(), tmp_path / "docs")
    assert (tmp_path / "docs" / "keep.txt").read_text() == "mine"


# ---- bad inputs ---------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    return save_quantized(quantized(tie=True), tmp_path / "q")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_files(tmp_path, saved):
    with pytest.raises(ModelError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")
    (saved / "tuneforge_quantized.safetensors").unlink()
    with pytest.raises(ModelError, match="no tuneforge_quantized.safetensors") as exc:
        load_quantized(saved)
    _one_line(exc)
    (saved / "tuneforge_quantization.json").unlink()
    with pytest.raises(ModelError, match="no tuneforge_quantization.json"):
        load_quantized(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights(saved, damage):
    path = saved / "tuneforge_quantized.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 8 + data[8:])
    how = "is truncated: its header says" if damage == "truncated" else "is not a safetensors file"
    with pytest.raises(ModelError, match=rf"tuneforge_quantized\.safetensors' {how}") as exc:
        load_quantized(saved)
    _one_line(exc)


def test_unknown_format_version_and_bad_json(saved):
    meta_path = saved / "tuneforge_quantization.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelError, match="format_version 99"):
        load_quantized(saved)
    meta_path.write_text("{not json")
    with pytest.raises(ModelError, match="tuneforge_quantization.json': malformed JSON at line 1"):
        load_quantized(saved)


def test_shape_mismatch_names_the_tensor(saved):
    path = saved / "tuneforge_quantized.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.down_proj.qweight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, path)
    with pytest.raises(ModelError, match=re.escape(f"'{name}' has shape")) as exc:
        load_quantized(saved)
    _one_line(exc)


# ---- QLoRA adapters are ordinary peft adapters --------------------------------------------------
def test_adapter_trained_on_4bit_base_loads_anywhere(tmp_path):
    from peft import PeftModel

    model = quantized()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    train_steps(model, steps=3)
    ids = tokens()
    trained = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    names = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert names and all(re.fullmatch(r"base_model\.model\..+\.lora_[AB]\.weight", n) for n in names)

    # onto the re-quantized base (same codes): exactly what it computed before saving
    requant = load_adapter(quantized(), tmp_path / "adapter")
    assert torch.equal(logits(requant, ids), trained)
    # and onto the quantized base read back from disk
    save_quantized(quantized(), tmp_path / "base-q")
    assert torch.equal(logits(load_adapter(load_quantized(tmp_path / "base-q"), tmp_path / "adapter"), ids), trained)

    # onto the unquantized base, in tuneforge and in peft: the same adapter, the same numbers
    ours = load_adapter(make_model("llama"), tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(make_model("llama"), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=1e-5)
    plain = logits(make_model("llama"), ids)
    assert not torch.allclose(logits(ours, ids), plain, atol=1e-3)  # the adapter does something


# ---- export of a model trained on a quantized base ----------------------------------------------
@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tiny_model_dir):
    """An adapter trained on the 4-bit (nf4, fp32 compute) tiny model, saved in peft's format."""
    from tuneforge.config import load_config
    from tuneforge.models import load_model_and_tokenizer

    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), **QUANT})
    model, _ = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    add_adapter(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 1000, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad()
    return save_adapter(model.eval(), tmp_path_factory.mktemp("qlora") / "adapter")


QUANT = {"quantization_bit": 4, "compute_dtype": "float32", "quantization_backend": "native"}
IDS = torch.tensor([[1, 17, 523, 99, 4000, 12, 7, 256]])


def _export_cfg(base, adapter, out, **extra):
    from tuneforge.config import load_config

    return load_config(None, {"model_name_or_path": str(base), "adapter_name_or_path": str(adapter),
                              "export_dir": str(out), "export_dtype": "float32", **QUANT, **extra})


def _quantized_with_adapter(cfg):
    from tuneforge.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(cfg.model, dtype=torch.float32)
    return load_adapter(model, cfg.model.adapter_name_or_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, qlora_adapter):
    from tuneforge.workflows import export

    out = tmp_path_factory.mktemp("export") / "merged"
    cfg = _export_cfg(tiny_model_dir, qlora_adapter, out)
    logger = logging.getLogger("tuneforge")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert export(cfg) == out
    finally:
        logger.removeHandler(handler)
    return cfg, out, [r.getMessage() for r in records]


def test_export_merges_dequantized_weights_and_says_so(exported):
    from transformers import AutoModelForCausalLM

    cfg, out, messages = exported
    note = [m for m in messages if m.startswith("base model is quantized (4-bit nf4): dequantized to float32")]
    assert len(note) == 1 and "merged into dequant(W) (for LoRA: dequant(W) + BA)" in note[0]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n or "qweight" in n for n in merged.state_dict())
    expected = logits(_quantized_with_adapter(cfg), IDS)
    torch.testing.assert_close(logits(merged, IDS), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_export_requantized_reports_its_error(exported, tiny_model_dir, qlora_adapter, tmp_path, caplog, bits):
    """A QLoRA adapter merged into dequant(W), then quantized again: transformers loads the export
    (its bitsandbytes format) with nothing missing, near the merged fp export, and the printed error
    is measured against those merged weights (tests/export/test_quantized_export.py checks the
    numbers and the weights one by one)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.workflows import export

    _, merged_dir, _ = exported
    out = tmp_path / "q"
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        export(_export_cfg(tiny_model_dir, qlora_adapter, out, export_quantization_bit=bits))
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantized the merged weights")]
    assert len(line) == 1
    rel = float(re.search(r"/ \|\|W\|\| = (\S+),", line[0]).group(1))
    assert 0 < rel < (0.15 if bits == 4 else 0.02)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_logits = logits(merged, IDS)
    # near the merged fp model (a 64-wide random model is far more sensitive than a real one)
    rel_logits = (logits(loaded.eval(), IDS).float() - merged_logits).norm() / merged_logits.norm()
    assert rel_logits < (0.3 if bits == 4 else 0.05)


def test_dequantize_then_merge_equals_quantized_forward():
    """The maths export relies on: merged dequant(W) + BA computes what base + adapter did."""
    from tuneforge.adapters import unload

    model = quantized()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    train_steps(model, steps=2)
    ids = tokens()
    before = logits(model, ids)
    merged = unload(dequantize_model(model), merge=True)
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), before, atol=1e-5, rtol=1e-5)
