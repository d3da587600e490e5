"""GGUF export: transformers' own GGUF loader reads our file back and answers like the merged model."""

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.export.gguf import write_gguf


@pytest.fixture(scope="module")
def merged(tiny_model_dir):
    """The tiny Llama with a LoRA (non-zero B) merged into it, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.adapters import LoraConfig, add_adapter, unload

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model = unload(model, merge=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _load_back(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _compare(model, other, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, other(ids).logits
        ga = model.generate(ids, max_new_tokens=12, do_sample=False)
        gb = other.generate(ids, max_new_tokens=12, do_sample=False)
    return (a - b).abs().max().item(), a.abs().max().item(), ga, gb


def test_f16_gguf_answers_like_the_merged_model(merged, tmp_path):
    model, tokenizer = merged
    path = write_gguf(model, tokenizer, tmp_path / "tiny.f16.gguf", "f16")
    back = _load_back(path)
    err, scale, ga, gb = _compare(model.half().float(), back, tokenizer)  # same f16 rounding
    model.float()
    assert err < 1e-3 * max(scale, 1.0)
    assert torch.equal(ga, gb)


def test_q8_0_loads_and_is_close(merged, tmp_path):
    model, tokenizer = merged
    back = _load_back(write_gguf(model, tokenizer, tmp_path / "tiny.q8_0.gguf", "q8_0"))
    err, scale, _, _ = _compare(model, back, tokenizer)
    assert err < 0.05 * scale


def test_q4_0_loads(merged, tmp_path):
    model, tokenizer = merged
    back = _load_back(write_gguf(model, tokenizer, tmp_path / "tiny.q4_0.gguf", "q4_0"))
    err, scale, _, _ = _compare(model, back, tokenizer)
    assert err < 0.5 * scale


def test_tokenizer_round_trips_through_gguf(merged, tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = merged
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f16")
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Hello world!  A <|im_start|>user\n12+7 = 19, café ünïcode\tend<|im_end|>"
    assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back.eos_token_id == tokenizer.eos_token_id
    assert back.chat_template == tokenizer.chat_template


def test_unsupported_architecture_names_export_format(merged, tmp_path):
    model, tokenizer = merged
    model.config.model_type = "gpt2"
    try:
        with pytest.raises(ConfigError, match="export_format"):
            write_gguf(model, tokenizer, tmp_path / "x.gguf")
    finally:
        model.config.model_type = "llama"


def test_tuneforge_export_writes_gguf_and_modelfile(tiny_model_dir, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.workflows import export

    out = tmp_path / "ollama"
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "export_dir": str(out),
                             "export_format": "gguf", "export_quantization": "q8_0",
                             "default_system": "Be brief."})
    assert export(cfg) == out
    export(cfg)  # a second export replaces the first
    assert [p.name for p in out.glob("*.gguf")] == ["ollama.q8_0.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./ollama.q8_0.gguf" in modelfile and 'SYSTEM """Be brief."""' in modelfile


@pytest.mark.integration
def test_default_model_f16_gguf_matches(default_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    path = write_gguf(model, tokenizer, tmp_path / "smollm2.f16.gguf", "f16")
    back = _load_back(path)
    err, scale, ga, gb = _compare(model.half().float(), back, tokenizer)
    assert err < 1e-3 * max(scale, 1.0)
    assert torch.equal(ga, gb)
