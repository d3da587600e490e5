"""The continuous-batching decode pieces: per-row token choice against transformers' own logits
processors, and KV-cache surgery (rows joining left-padded, rows leaving) against plain runs."""

from __future__ import annotations

import pytest
import torch

from tuneforge.infer.decode import Sampling, join, keep_rows, next_token, processed_logits


@pytest.mark.parametrize("s", [
    Sampling(do_sample=False, repetition_penalty=1.3),
    Sampling(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2),
    Sampling(do_sample=True, temperature=1.3, top_k=0, top_p=0.5),
    Sampling(do_sample=True, temperature=1.0, top_k=5, top_p=1.0),
])
def test_processed_logits_match_transformers_processors(s):
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(500) * 3
    history = torch.randint(0, 500, (40,)).tolist()
    chain = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.do_sample:
        chain += [TemperatureLogitsWarper(s.temperature)]
        if s.top_k:
            chain.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            chain.append(TopPLogitsWarper(s.top_p))
    expected = chain(torch.tensor([history]), logits[None].clone())[0]
    torch.testing.assert_close(processed_logits(logits, history, s), expected)


def test_seeded_draws_repeat_and_greedy_is_argmax():
    logits = torch.randn(100)
    s = Sampling(do_sample=True, temperature=1.0)
    draws = [next_token(logits, [], s, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1
    assert next_token(logits, [], Sampling(), None) == int(logits.argmax())


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _cache_arg(model) -> str:
    """transformers renamed past_key_values to cache (the batcher asks the same way)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model, rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True)
    return getattr(out, _cache_arg(model)), mask


def _step(model, cache, mask, tokens, positions):
    mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], 1)
    out = model(input_ids=torch.tensor(tokens)[:, None], attention_mask=mask,
                position_ids=torch.tensor(positions)[:, None], use_cache=True, **{_cache_arg(model): cache})
    return out.logits[:, -1], getattr(out, _cache_arg(model)), mask


@torch.inference_mode()
def test_joined_and_dropped_rows_step_like_single_runs():
    model = _tiny()
    a, b, c = [5, 9, 2, 7, 7, 1, 3], [4, 4, 8], [1, 2, 3, 4, 5]
    alone = {}
    for name, prompt in (("a", a), ("b", b), ("c", c)):
        cache, mask = _prefill(model, [prompt])
        alone[name] = _step(model, cache, mask, [11], [len(prompt)])[0][0]
    cache, mask = _prefill(model, [a, c])          # a and c run together ...
    new_cache, new_mask = _prefill(model, [b])     # ... b joins, shorter: left-padded
    cache, mask = join(cache, mask, new_cache, new_mask)
    cache, mask = keep_rows(cache, mask, [0, 2])   # c leaves; c's padding columns go too
    assert mask.shape[1] == len(a) and cache.layers[0].keys.shape[2] == len(a)
    logits, _, _ = _step(model, cache, mask, [11, 11], [len(a), len(b)])
    torch.testing.assert_close(logits[0], alone["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], alone["b"], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_keeping_no_rows_empties_the_cache():
    model = _tiny()
    cache, mask = _prefill(model, [[5, 9, 2], [4, 4]])
    cache, mask = keep_rows(cache, mask, [])
    assert mask.shape[0] == 0 and cache.layers[0].keys.shape[0] == 0
