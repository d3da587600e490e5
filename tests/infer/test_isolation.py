"""One request's failure is its own: a row that fails to set up, to prefill or to sample ends with
its exception while the requests batched with it answer exactly as they do alone."""

from __future__ import annotations

import time

import pytest

from tuneforge.adapters.routing import BASE
from tuneforge.infer.batcher import Job
from tuneforge.infer.engine import Engine

ASK = [{"role": "user", "content": "Tell me about the mountains, please."}]
OTHER = [{"role": "user", "content": "And the sea?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.adapters import LoraConfig, add_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name="a")
    return Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), {"alpha": "a"})


def _bad_seed(engine):
    return Job(engine.encode(ASK), BASE, engine.generation_kwargs(0.8, None, 8), seed=2**64)


def _unknown_adapter(engine):
    return Job(engine.encode(ASK), "no-such-adapter", engine.generation_kwargs(0, None, 8))


def _broken_sampling(engine):
    kwargs = engine.generation_kwargs(0.8, None, 8)
    return Job(engine.encode(ASK), BASE, {**kwargs, "top_k": "many"})


def _no_limit(engine):
    kwargs = dict(engine.generation_kwargs(0, None, 8))
    del kwargs["max_new_tokens"]
    return Job(engine.encode(OTHER), BASE, kwargs)


def _drain(job):
    items = []
    while True:
        item = job.out.get(timeout=60)
        if item is not None and not isinstance(item, int):
            return items, item
        items.append(item)


@pytest.mark.parametrize("make_bad", [_bad_seed, _unknown_adapter, _broken_sampling, _no_limit])
def test_a_failing_row_fails_only_its_own_request(engine, make_bad):
    names, prompts, limits = ["alpha", engine.base_name], [ASK, OTHER], [12, 9]
    alone = ["".join(engine.generate(n, m, temperature=0, max_tokens=k))
             for n, m, k in zip(names, prompts, limits)]
    failed = engine.batcher.counts["failed"]
    with engine.batcher.lock:  # all three are queued before the worker admits any: one batch
        good = [engine.generate(n, m, temperature=0, max_tokens=k)
                for n, m, k in zip(names, prompts, limits)]
        bad = make_bad(engine)
        engine.batcher.submit(bad)
    _, last = _drain(bad)
    assert isinstance(last, Exception)
    assert ["".join(g) for g in good] == alone
    assert engine.batcher.counts["failed"] == failed + 1
    assert engine.batcher.stats()["live"] == 0
    assert "".join(engine.generate("alpha", ASK, temperature=0, max_tokens=12)) == alone[0]  # and after


def test_a_tiny_temperature_samples_the_likeliest_token(engine):
    greedy = "".join(engine.generate("alpha", ASK, temperature=0, max_tokens=10))
    for t in (1e-45, 1e-30):  # the scaled logits overflow float32
        assert "".join(engine.generate("alpha", ASK, temperature=t, seed=1, max_tokens=10)) == greedy


def test_top_p_zero_keeps_the_likeliest_token(engine):
    greedy = "".join(engine.generate("alpha", ASK, temperature=0, max_tokens=10))
    assert "".join(engine.generate("alpha", ASK, temperature=1.0, top_p=0.0, seed=3, max_tokens=10)) == greedy


def test_a_failed_batch_step_fails_its_rows_and_the_worker_lives_on(engine, monkeypatch):
    calls = {"n": 0}
    forward = engine.batcher._forward

    def once(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step, after the prefill
            raise RuntimeError("device lost, say")
        return forward(*args)

    monkeypatch.setattr(engine.batcher, "_forward", once)
    with pytest.raises(RuntimeError, match="device lost"):
        "".join(engine.generate("alpha", ASK, temperature=0, max_tokens=10))
    monkeypatch.undo()
    assert engine.batcher.stats()["cache"] is False
    assert len("".join(engine.generate("alpha", ASK, temperature=0, max_tokens=3))) > 0


def test_the_kv_cache_is_freed_before_memory_is_given_back(engine, monkeypatch):
    """When the batch empties its cache is gone (no frame or traceback keeps it) by the time
    malloc_trim returns the memory to the system."""
    import weakref

    from tuneforge.infer import batcher

    caches, alive_at_trim = [], []
    forward = engine.batcher._forward

    def spy(*args):
        logits, cache = forward(*args)
        caches.append(weakref.ref(cache))
        return logits, cache

    monkeypatch.setattr(engine.batcher, "_forward", spy)
    monkeypatch.setattr(batcher, "_TRIM", lambda pad: alive_at_trim.append(
        sum(ref() is not None for ref in caches)))
    for limit in (1, 4):  # ends in the prefill, or in a later step
        "".join(engine.generate("alpha", ASK, temperature=0, max_tokens=limit))
        while engine.batcher.stats()["cache"]:  # the step after the last token empties the batch
            time.sleep(0.001)
        with engine.batcher.lock:  # ... and trims in the same step
            pass
    # one trim per emptied batch (a batch a previous test left may empty here too, under load)
    assert caches and len(alive_at_trim) >= 2 and not any(alive_at_trim), alive_at_trim


def test_temperature_zero_in_the_config_means_greedy():
    """`tuneforge chat temperature=0` (do_sample on by default) decodes greedily, as a request with
    temperature 0 does, instead of transformers refusing the value."""
    from types import SimpleNamespace

    from tuneforge.config import load_config
    from tuneforge.infer.generation import generation_kwargs

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    gen = load_config(None, {"temperature": 0}).generate
    assert gen.do_sample
    kwargs = generation_kwargs(gen, tok)
    assert kwargs["do_sample"] is False and kwargs["temperature"] is None
    assert generation_kwargs(load_config(None, {"temperature": 0.7}).generate, tok)["temperature"] == 0.7
