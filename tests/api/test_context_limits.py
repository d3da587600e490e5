"""Prompt and max_tokens against the model's context: a prompt that leaves no room for an answer
token is a 400 naming the limit (streamed or not); a max_tokens beyond the room left is capped,
the answer ending with finish_reason "length"; no max_tokens means up to the context."""

from __future__ import annotations

import openai
import pytest

from tuneforge.api.server import BackgroundServer
from tuneforge.infer.engine import Engine, RequestError

ASK = [{"role": "user", "content": "Hello there, how are you?"}]
ROOM = 6


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir), base_name="tiny")
    assert engine.context == 512  # the tiny model's max_position_embeddings
    prompt = engine.encode(ASK).shape[1]
    engine.context = prompt + ROOM
    with BackgroundServer(engine) as url:
        yield engine, openai.OpenAI(base_url=url, api_key="none", max_retries=0), prompt


def test_context_is_read_from_the_model_config(tiny_model_dir, default_model_path):
    from transformers import AutoConfig, AutoTokenizer

    from tuneforge.infer.generation import context_length

    class Fake:
        config = AutoConfig.from_pretrained(default_model_path)

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    assert context_length(Fake(), tokenizer) == 8192  # SmolLM2; its tokenizer names no real limit
    tokenizer.model_max_length = 2048
    assert context_length(Fake(), tokenizer) == 2048  # the smaller of the two
    Fake.config = AutoConfig.for_model("gpt2", n_positions=300)
    assert context_length(Fake()) == 300


@pytest.mark.parametrize("max_tokens", [ROOM + 1, 10**6, 2**63])
@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_beyond_the_room_is_capped(served, max_tokens, stream):
    engine, client, prompt = served
    out = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=max_tokens,
                                         stream=stream, stream_options={"include_usage": True} if stream else None)
    if stream:
        chunks = list(out)
        usage, finish = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        usage, finish = out.usage, out.choices[0].finish_reason
    assert usage.prompt_tokens == prompt
    if finish == "length":
        assert usage.completion_tokens == ROOM
    else:  # the model said eos first
        assert usage.completion_tokens < ROOM


def test_no_max_tokens_means_up_to_the_context(served):
    engine, client, prompt = served
    configured = engine.gen.max_new_tokens
    engine.gen.max_new_tokens = 2  # the config's limit is not the API's: OpenAI runs to the context
    try:
        out = client.chat.completions.create(model="tiny", messages=ASK, temperature=0)
    finally:
        engine.gen.max_new_tokens = configured
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == ROOM


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_the_context_cannot_hold_is_a_400(served, stream):
    engine, client, prompt = served
    longer = [{"role": "user", "content": "Hello there, how are you? " + "Fine. " * ROOM}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=longer, stream=stream)
    size = engine.encode(longer).shape[1]
    assert size >= engine.context
    assert info.value.body["param"] == "messages"
    assert info.value.body["message"] == (
        f"the prompt is {size} tokens but this model's context is {engine.context} tokens, "
        "which must also hold at least one answer token; shorten the messages")
    assert engine.batcher.stats()["live"] == 0


def test_budget_edges(served):
    engine, _, prompt = served
    assert engine.answer_budget(engine.context - 1, None) == 1
    assert engine.answer_budget(engine.context - 1, 50) == 1
    assert engine.answer_budget(prompt, 2) == 2
    for size in (engine.context, engine.context + 1, 9000):
        with pytest.raises(RequestError, match=f"the prompt is {size} tokens"):
            engine.answer_budget(size, 1)
