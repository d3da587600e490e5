"""Write a merged HF causal LM + its tokenizer as one GGUF file (llama.cpp / Ollama).

Layout (tensor names, metadata keys, Q/K rotary permutation) follows what llama.cpp's loader
expects for the `llama` architecture; transformers' GGUF loader reads the same file back, which
is how the tests prove it. Norms stay F32 as llama.cpp keeps them; 2-D weights take the
requested type (f16, q8_0, q4_0), falling back to F16 when a row does not fill whole blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError

QUANTIZATIONS = ("f16", "q8_0", "q4_0")
# HF model_type -> GGUF architecture name; all share llama's tensor layout and rotary permute
_ARCHES = {"llama": "llama", "mistral": "llama"}

# HF parameter suffix inside model.layers.N -> llama.cpp tensor name inside blk.N
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary halves split (rotate_half); llama.cpp wants them
    interleaved pairwise. transformers' GGUF loader applies the inverse of this on load."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        name = _LAYER_NAMES.get(".".join(parts[3:]))
        if name:
            return f"blk.{parts[2]}.{name}"
    return None  # rotary buffers etc.: llama.cpp recomputes them


def _encode_tensor(name: str, w: np.ndarray, quantization: str):
    """-> (array, raw_dtype or None). 1-D tensors (norms) stay F32."""
    import gguf

    if w.ndim < 2:
        return w.astype(np.float32), None
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(quantization)
    if quantization == "q4_0" and name in ("token_embd.weight", "output.weight"):
        # the vocabulary projection is the most sensitive tensor (tied models use token_embd for
        # it); llama.cpp's own q4 files keep it at higher precision too
        qtype = gguf.GGMLQuantizationType.Q8_0
    if qtype is not None:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.shape[-1] % block == 0:
            return gguf.quants.quantize(w.astype(np.float32), qtype), qtype
    return w.astype(np.float16), None


def _add_tokenizer(writer, tokenizer) -> None:
    """BPE (gpt2-style) vocab, merges and special ids from the fast tokenizer's tokenizer.json."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"export_format 'gguf' supports BPE tokenizers only (this one is "
                          f"{model.get('type')!r}); use export_format: hf")
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
    # smollm's pre-tokenizer is llama.cpp's "smollm"; others get llama.cpp's generic one
    writer.add_tokenizer_pre("smollm" if "<|im_start|>" in vocab and size == 49152 else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: Path, quantization: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a merged transformers causal LM) and `tokenizer` to `path` (.gguf)."""
    import gguf

    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"export_quantization must be one of {', '.join(QUANTIZATIONS)}, "
                          f"got {quantization!r}")
    cfg = model.config
    arch = _ARCHES.get(cfg.model_type)
    if arch is None:
        raise ConfigError(f"export_format 'gguf' supports Llama-family models ({', '.join(_ARCHES)}); "
                          f"this one is {cfg.model_type!r}: use export_format: hf")
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or path.stem)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quantization]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer)

    state = model.state_dict()
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight: llama.cpp (and transformers) tie it to token_embd
        out = _tensor_name(hf_name)
        if out is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise ConfigError(f"export_format 'gguf' cannot map tensor {hf_name!r} of this "
                              f"{cfg.model_type} model; use export_format: hf")
        w = tensor.detach().float().cpu().numpy()
        if out.endswith("attn_q.weight"):
            w = _permute_rotary(w, n_head)
        elif out.endswith("attn_k.weight"):
            w = _permute_rotary(w, n_kv)
        data, raw_dtype = _encode_tensor(out, w, quantization)
        writer.add_tensor(out, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
