"""The context budget counts an adapter's virtual tokens: a prefix- or prompt-tuning adapter's
num_virtual_tokens (a MAM adapter's prefix too) take positions of the model's context before the prompt, so the answer of a
request for it gets that many tokens less, and a prompt that fits only without them is a 400
naming the adapter. Requests for a LoRA adapter or the base keep the whole context.

The model is a tiny GPT-2 with a 64-token context: its positions are learned embeddings, so a
row that ran past the context would fail (an index past the table), not just degrade."""

from __future__ import annotations

import openai
import pytest
import torch

import tuneforge
from tuneforge.adapters import LoraConfig, PrefixTuningConfig, PromptTuningConfig, add_adapter
from tuneforge.api.server import BackgroundServer
from tuneforge.infer.engine import Engine, RequestError

CONTEXT = 64
VIRTUAL = {"prefix": 20, "prompt": 12, "mam": 8, "lora": 0, "tiny": 0}
ASK = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    add_adapter(model, PrefixTuningConfig(num_virtual_tokens=VIRTUAL["prefix"]), "prefix")
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=VIRTUAL["prompt"]), "prompt")
    add_adapter(model, tuneforge.MamConfig(num_virtual_tokens=VIRTUAL["mam"], adapter_size=8), "mam")
    add_adapter(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False), "lora")
    engine = Engine(model, tokenizer, {name: name for name in VIRTUAL if name != "tiny"}, base_name="tiny")
    engine.eos_ids = engine.batcher.eos = set()  # every answer runs to its limit
    assert engine.context == CONTEXT
    return engine


def _longer(engine, low: int, high: int) -> list[dict]:
    """Messages whose prompt is low..high tokens."""
    for words in range(1, 4 * CONTEXT):
        messages = [{"role": "user", "content": "Hello there, how are you? " + "fine " * words}]
        if low <= engine.encode(messages).shape[1] <= high:
            return messages
    raise AssertionError(f"no prompt of {low}..{high} tokens")


def test_budget_counts_the_requested_adapters_virtual_tokens(engine):
    prompt = engine.encode(ASK).shape[1]
    assert prompt + VIRTUAL["prefix"] < CONTEXT - 5
    for name, virtual in VIRTUAL.items():
        assert engine.virtual_tokens(name) == ((virtual, name) if virtual else (0, None))
        assert engine.answer_budget(prompt, None, name) == CONTEXT - virtual - prompt
        assert engine.answer_budget(prompt, 10**6, name) == CONTEXT - virtual - prompt
        assert engine.answer_budget(prompt, 5, name) == 5
    assert engine.answer_budget(CONTEXT - VIRTUAL["prefix"] - 1, None, "prefix") == 1
    with pytest.raises(RequestError, match="adapter 'prefix' adds 20 virtual tokens"):
        engine.answer_budget(CONTEXT - VIRTUAL["prefix"], None, "prefix")


def test_answers_of_every_adapter_run_to_the_end_of_the_context_in_one_batch(engine):
    """All of them in one batch, each to its own limit: positions past the context would raise."""
    prompt = engine.encode(ASK).shape[1]
    generations = {name: engine.generate(name, ASK, temperature=0) for name in VIRTUAL}
    for name, generation in generations.items():
        "".join(generation)  # raises what the batch raised
        assert generation.result.finish_reason == "length"
        assert generation.result.completion_tokens == CONTEXT - VIRTUAL[name] - prompt, name
    assert engine.batcher.largest_batch >= 2


def test_a_prompt_that_fits_only_without_the_adapter_is_a_400(engine):
    messages = _longer(engine, CONTEXT - VIRTUAL["prefix"], CONTEXT - 2)
    size = engine.encode(messages).shape[1]
    with BackgroundServer(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="prefix", messages=messages, max_tokens=1)
        lora = client.chat.completions.create(model="lora", messages=messages, temperature=0)
    assert info.value.body["param"] == "messages"
    assert info.value.body["message"] == (
        f"the prompt is {size} tokens and adapter 'prefix' adds 20 virtual tokens, but this model's "
        f"context is {CONTEXT} tokens, which must also hold at least one answer token; shorten the messages")
    assert lora.usage.prompt_tokens == size and lora.usage.completion_tokens == CONTEXT - size
    assert engine.batcher.stats()["live"] == 0
