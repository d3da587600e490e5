"""Writes the few-kilobyte models some export cases hold (run from the repository root:
`python tests/bad_inputs/export/make_tiny_models.py`); each is refused by a GGUF export for one
reason: gpt2 (architecture), wordlevel (tokenizer), biased (a tensor GGUF's llama has no name
for), yarn (rope scaling). Not a test; the cases keep their output."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).parent
WORDS = ["<s>", "</s>", "a", "b", "c", "d", "e", "the", "cat", "sat", "on", "mat"] + [str(i) for i in range(20)]


def tokenizer(kind: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    if kind == "bpe":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="a"))
    else:
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def llama(**extra) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=1, **extra))


def build(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_embd=8, n_layer=1, n_head=2,
                                          n_positions=32, bos_token_id=0, eos_token_id=1)), tokenizer("bpe")
    if kind == "wordlevel":
        return llama(), tokenizer("wordlevel")
    if kind == "biased":
        return llama(attention_bias=True), tokenizer("bpe")
    if kind == "yarn":
        return llama(rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                   "original_max_position_embeddings": 32}), tokenizer("bpe")
    raise ValueError(kind)


if __name__ == "__main__":
    kind, out = sys.argv[1], Path(sys.argv[2])
    model, tok = build(kind)
    model.save_pretrained(out)
    tok.save_pretrained(out)
