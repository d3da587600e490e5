"""Write a merged HF causal LM + its tokenizer as one GGUF file (llama.cpp / Ollama).

Layout (tensor names, metadata keys, Q/K rotary permutation, rope scaling) follows what
llama.cpp's loader expects for each architecture in gguf_arch.py; the tokenizer goes in as
gguf_vocab.py describes. transformers' GGUF loader reads the file back, which is how the tests
prove it (benchmarks/gguf_llamacpp.py runs it in llama.cpp itself). Norms and biases stay F32 as
llama.cpp keeps them; 2-D weights take the requested type (f16, q8_0, q4_0), falling back to F16
when a row does not fill whole blocks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .gguf_arch import Arch, arch_of, permute_rotary, rope_scaling, tensor_name
from .gguf_vocab import add_tokenizer, tokenizer_spec

QUANTIZATIONS = ("f16", "q8_0", "q4_0")


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


@dataclass
class _Layout:
    """What the file will say about the model, worked out before anything is written."""
    arch: Arch
    n_head: int
    n_kv: int
    head_dim: int
    theta: float
    scaling: dict
    rope_freqs: np.ndarray | None
    names: dict[str, str]  # HF state-dict name -> GGUF tensor name, in write order


def _layout(model) -> _Layout:
    cfg = model.config
    arch = arch_of(cfg)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    scaling, rope_freqs = rope_scaling(model, arch, head_dim, theta)
    tied = getattr(cfg, "tie_word_embeddings", False)
    names = {}
    for hf_name in model.state_dict():
        if tied and hf_name == "lm_head.weight":
            continue  # no output.weight: llama.cpp (and transformers) tie it to token_embd
        out = tensor_name(hf_name, arch)
        if out is None:
            if hf_name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
                continue
            raise ConfigError(f"export_format 'gguf' cannot map tensor {hf_name!r} of this "
                              f"{cfg.model_type} model; use export_format: hf")
        names[hf_name] = out
    return _Layout(arch, n_head, n_kv, head_dim, theta, scaling, rope_freqs, names)


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"export_quantization must be one of {', '.join(QUANTIZATIONS)}, "
                          f"got {quantization!r}")


def check_gguf(model, tokenizer, quantization: str) -> None:
    """Everything a GGUF export of `model` can refuse (quantization type, architecture, rope
    scaling, tensor names, tokenizer), checked on the base model before any merge or write.
    Raises ConfigError (one line)."""
    _check_quantization(quantization)
    _layout(model)
    tokenizer_spec(tokenizer)


def gguf_size(model, quantization: str) -> int:
    """Bytes the tensors of a GGUF export of `model` take, about (for the free-space check)."""
    per_value = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[quantization]
    tied = getattr(model.config, "tie_word_embeddings", False)
    total = 0.0
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        total += tensor.numel() * (per_value if tensor.dim() >= 2 else 4)
    return int(total)


def write_gguf(model, tokenizer, path: Path, quantization: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a merged transformers causal LM) and `tokenizer` to `path` (.gguf).
    Raises ConfigError, before the file is opened, for anything check_gguf refuses."""
    import gguf

    _check_quantization(quantization)
    layout = _layout(model)
    tokenizer_spec(tokenizer)
    cfg = model.config
    arch, n_head, n_kv, head_dim = layout.arch, layout.n_head, layout.n_kv, layout.head_dim
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(name or path.stem)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != cfg.hidden_size // n_head:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(layout.theta)
    if layout.scaling.get("type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(layout.scaling["factor"])
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quantization]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer)
    if layout.rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", layout.rope_freqs)

    state = model.state_dict()
    for hf_name, out in layout.names.items():
        w = state[hf_name].detach().float().cpu().numpy()
        if arch.permute_qk and out.endswith(("attn_q.weight", "attn_q.bias")):
            w = permute_rotary(w, n_head)
        elif arch.permute_qk and out.endswith(("attn_k.weight", "attn_k.bias")):
            w = permute_rotary(w, n_kv)
        data, raw_dtype = _encode_tensor(out, w, quantization)
        writer.add_tensor(out, data, raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
