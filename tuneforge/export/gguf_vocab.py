"""A fast (tokenizers-library) BPE tokenizer as GGUF metadata: tokens, types, merges, special
ids, the chat template, and `tokenizer.ggml.pre`, the name by which llama.cpp picks its
pre-tokenizer. The name is read off the tokenizer's own pre-tokenizer; one llama.cpp does not
have under a known name is refused, because a wrong guess tokenizes differently in silence."""

from __future__ import annotations

import json

from ..errors import ConfigError

# the Split patterns of two tokenizer families: digits in runs of up to 3, or one at a time
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json `spec`."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"  # one digit at a time, then GPT-2's split (SmolLM, StarCoder-style)
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        name = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
        if name and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return name
    raise ConfigError("export_format 'gguf': this tokenizer's pre-tokenizer "
                      f"({json.dumps(pre)[:160]}) is not one tuneforge can name for llama.cpp "
                      "(gpt-2, smollm, llama-bpe, qwen2 are); use export_format: hf")


def tokenizer_spec(tokenizer) -> tuple[dict, str]:
    """(tokenizer.json as a dict, llama.cpp pre-tokenizer name); ConfigError for a tokenizer a
    GGUF file cannot describe (not fast, not BPE, an unknown pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("export_format 'gguf' needs a fast tokenizer (tokenizer.json); "
                          "use export_format: hf")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"export_format 'gguf' supports BPE tokenizers only (this one is "
                          f"{model.get('type')!r}); use export_format: hf")
    return spec, pre_tokenizer_name(spec)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first itself (Llama 3's does, SmolLM2's and Qwen's don't);
    llama.cpp then adds it too, so a prompt template must not write it."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def add_tokenizer(writer, tokenizer) -> None:
    import gguf

    spec, pre = tokenizer_spec(tokenizer)
    model = spec["model"]
    vocab = dict(model["vocab"])
    special = set()
    for tok in spec.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        if tok.get("special"):
            special.add(tok["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(adds_bos(tokenizer))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
