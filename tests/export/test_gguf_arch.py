"""GGUF export beyond plain Llama: Qwen2 (q/k/v biases), Qwen3 (q/k norms, its own head size),
rope scaling, and the tokenizer's pre-tokenizer name. transformers' GGUF loader is the oracle
where it reads the architecture; for rope_freqs the oracle is transformers' own frequencies."""

import json

import numpy as np
import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.export.gguf import write_gguf
from tuneforge.export.gguf_vocab import pre_tokenizer_name


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _random(kind, vocab, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # zero biases would pass with any layout
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _as_in_file(model):
    """The file holds matrices in f16, norms and biases in f32."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
    return model


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if field.types[0].name == "STRING" else value.tolist()


# transformers reads no head size from a qwen3 GGUF and assumes Qwen3Config's 128, which the
# file also states (attention.key_length); llama.cpp reads it (benchmarks/gguf_llamacpp.py)
@pytest.mark.parametrize("kind, extra", [("qwen2", {}), ("qwen3", {"head_dim": 128})])
def test_read_back_by_transformers_answers_alike(kind, extra, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _random(kind, len(tokenizer), **extra)
    path = write_gguf(model, tokenizer, tmp_path / f"{kind}.f16.gguf", "f16")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert back.config.model_type == kind
    reference = _as_in_file(model)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, reference(ids).logits, atol=2e-5, rtol=1e-4)
        greedy = [m.generate(ids, max_new_tokens=8, do_sample=False) for m in (back, reference)]
    assert torch.equal(*greedy)


def test_llama3_rope_frequencies_are_transformers_own(tokenizer, tmp_path):
    import gguf

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    model = _random("llama", len(tokenizer), rope_scaling=rope)
    reader = gguf.GGUFReader(str(write_gguf(model, tokenizer, tmp_path / "l3.gguf", "f16")))
    (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    head_dim = 16
    base = 500000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    # llama.cpp rotates pair i by position * base_i / rope_freqs_i
    np.testing.assert_allclose(base / np.asarray(freqs.data), model.model.rotary_emb.inv_freq.numpy(),
                               rtol=1e-6)
    assert np.asarray(freqs.data).max() == pytest.approx(8.0)  # the lowest frequencies: / factor
    assert _field(reader, "llama.rope.freq_base") == [500000.0]


def test_linear_rope_scaling_keys(tokenizer, tmp_path):
    import gguf

    model = _random("llama", len(tokenizer), rope_scaling={"rope_type": "linear", "factor": 4.0})
    reader = gguf.GGUFReader(str(write_gguf(model, tokenizer, tmp_path / "lin.gguf", "f16")))
    assert _field(reader, "llama.rope.scaling.type") == "linear"
    assert _field(reader, "llama.rope.scaling.factor") == [4.0]
    assert not any(t.name == "rope_freqs.weight" for t in reader.tensors)


def test_unsupported_rope_and_sliding_window_are_refused(tokenizer, tmp_path):
    yarn = _random("llama", len(tokenizer), rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
        write_gguf(yarn, tokenizer, tmp_path / "y.gguf", "f16")
    windowed = _random("qwen2", len(tokenizer), use_sliding_window=True, sliding_window=64)
    with pytest.raises(ConfigError, match="sliding window"):
        write_gguf(windowed, tokenizer, tmp_path / "w.gguf", "f16")
    assert not list(tmp_path.iterdir())  # nothing half-written


LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _spec(pre) -> dict:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre
    return json.loads(tok.to_str())


def test_pre_tokenizer_names():
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    assert pre_tokenizer_name(_spec(pt.ByteLevel(add_prefix_space=False))) == "gpt-2"
    assert pre_tokenizer_name(_spec(pt.Sequence([pt.Digits(individual_digits=True),
                                                 pt.ByteLevel(add_prefix_space=False)]))) == "smollm"
    for pattern, name in ((LLAMA3, "llama-bpe"), (QWEN2, "qwen2")):
        split = pt.Split(Regex(pattern), behavior="isolated")
        assert pre_tokenizer_name(_spec(pt.Sequence([split, byte_level]))) == name
    for unknown in (pt.Whitespace(), pt.Sequence([pt.Split(Regex(r"\s+"), behavior="isolated"), byte_level])):
        with pytest.raises(ConfigError, match="pre-tokenizer"):
            pre_tokenizer_name(_spec(unknown))
