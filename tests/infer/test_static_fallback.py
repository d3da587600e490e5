"""A model whose KV cache cannot be reshaped (sliding-window layers) still serves every request
right: new requests wait for the running batch instead of joining it."""

from __future__ import annotations

import torch

from tuneforge.infer.engine import Engine

OTHER = [{"role": "user", "content": "And the sea?"}]
FIRST = [{"role": "user", "content": "Tell me about the mountains, please."}]


def test_sliding_window_model_batches_statically(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.for_model("mistral", vocab_size=len(tokenizer), hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, sliding_window=16,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    engine = Engine(AutoModelForCausalLM.from_config(config), tokenizer)
    alone_first = "".join(engine.generate("base", FIRST, temperature=0, max_tokens=30))
    alone_other = "".join(engine.generate("base", OTHER, temperature=0, max_tokens=6))
    first = engine.generate("base", FIRST, temperature=0, max_tokens=30)
    pieces = iter(first)
    head = next(pieces)
    other = "".join(engine.generate("base", OTHER, temperature=0, max_tokens=6))
    assert head + "".join(pieces) == alone_first and other == alone_other
    assert engine.batcher.joined_running == 0  # it waited rather than joined
    together = [engine.generate("base", m, temperature=0, max_tokens=n)
                for m, n in ((FIRST, 30), (OTHER, 6))]  # queued at once: one static batch
    assert ["".join(g) for g in together] == [alone_first, alone_other]
