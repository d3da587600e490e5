"""The real uvicorn server on a free local port, driven by the official openai client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.conftest import save_moved_adapter
from tuneforge.api.server import BackgroundServer
from tuneforge.config import load_config
from tuneforge.infer import ChatModel
from tuneforge.infer.engine import Engine

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


def _make_adapter(model_dir, out, seed):
    from tuneforge.adapters import LoraConfig

    return save_moved_adapter(model_dir, out, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = _make_adapter(tiny_model_dir, root / "alpha", 1)
    b = _make_adapter(tiny_model_dir, root / "beta", 2)
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir),
                             "adapter_name_or_path": f"{a},{b}"})
    engine = Engine.from_config(cfg)
    with BackgroundServer(engine, api_key=KEY) as url:
        yield {"url": url, "engine": engine, "dir": tiny_model_dir, "alpha": a, "beta": b}


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup["url"], api_key=KEY, max_retries=0)


def _raw(url, data: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    """A request without the openai client (a body it would not send, no auth header)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chat(client, model, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, **kw)


def _direct(model_dir, adapter=None, max_new_tokens=12):
    values = {"model_name_or_path": str(model_dir), "do_sample": False}
    if adapter:
        values["adapter_name_or_path"] = str(adapter)
    return ChatModel(load_config(None, values)).answer(MESSAGES, max_new_tokens=max_new_tokens)


def test_list_models(setup, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [setup["engine"].base_name, "alpha", "beta"]


def test_chat_usage_and_stream_matches(setup, client):
    base = setup["engine"].base_name
    out = _chat(client, base)
    text = out.choices[0].message.content
    assert out.usage.prompt_tokens == setup["engine"].encode(MESSAGES).shape[1]
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if out.usage.completion_tokens == 12:
        assert out.choices[0].finish_reason == "length"
    chunks = list(_chat(client, base, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert all(c.choices for c in chunks)  # a client reading choices[0] of each chunk is safe
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    asked = list(_chat(client, base, stream=True, stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage == out.usage  # OpenAI's usage chunk
    assert asked[-2].choices[0].finish_reason == out.choices[0].finish_reason and asked[-2].usage is None


def test_adapter_selection_matches_direct_runs(setup, client):
    base = _chat(client, setup["engine"].base_name).choices[0].message.content
    alpha = _chat(client, "alpha").choices[0].message.content
    beta = _chat(client, "beta").choices[0].message.content
    assert len({base, alpha, beta}) == 3
    assert base == _direct(setup["dir"])
    assert alpha == _direct(setup["dir"], setup["alpha"])
    assert beta == _direct(setup["dir"], setup["beta"])


def test_stop_and_max_tokens(setup, client):
    full = _chat(client, "alpha", max_tokens=12).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    cut = _chat(client, "alpha", max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _chat(client, "alpha", max_tokens=12, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.find(stop)]
    one = _chat(client, "alpha", max_tokens=1)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"


def test_n_choices_share_a_batch_and_stream_by_index(setup, client):
    single = _chat(client, "alpha")
    out = _chat(client, "alpha", n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert {c.message.content for c in out.choices} == {single.choices[0].message.content}  # greedy
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens == 3 * single.usage.completion_tokens
    texts = {0: "", 1: ""}
    finished = []
    for chunk in _chat(client, "alpha", n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert texts == {0: single.choices[0].message.content, 1: single.choices[0].message.content}
    assert sorted(finished) == [0, 1]
    sampled = client.chat.completions.create(model="beta", messages=MESSAGES, n=4, temperature=1.0,
                                             seed=3, max_tokens=8)
    assert len({c.message.content for c in sampled.choices}) > 1  # seed + i: different choices


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"response_format": {"type": "json_object"}},
    {"logprobs": True},
    {"frequency_penalty": 0.5},
])
def test_fields_it_cannot_honour_are_400_not_ignored(client, extra):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, "alpha", **extra)
    assert info.value.body["param"] == next(iter(extra))
    assert info.value.body["code"] == "unsupported_parameter"
    _chat(client, "alpha", max_tokens=2, user="someone", tool_choice="none", frequency_penalty=0)  # harmless


def test_sampling_with_seed_is_repeatable(client):
    kw = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    first = client.chat.completions.create(model="beta", messages=MESSAGES, **kw)
    again = client.chat.completions.create(model="beta", messages=MESSAGES, **kw)
    assert first.choices[0].message.content == again.choices[0].message.content


def test_wrong_key_is_401(setup):
    bad = openai.OpenAI(base_url=setup["url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        _chat(bad, "alpha")
    status, body = _raw(setup["url"] + "/models", key=None)  # no header at all
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, "no-such-adapter")
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    {"messages": MESSAGES},                                          # no model
    {"model": "alpha", "messages": []},                              # no messages
    {"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]},
    {"model": "alpha", "messages": MESSAGES, "temperature": -1},
    {"model": "alpha", "messages": MESSAGES, "max_tokens": 0},
    {"model": "alpha", "messages": MESSAGES, "top_p": "lots"},
])
def test_bad_body_is_400(setup, client, body):
    if "model" in body:  # what the openai client lets through reaches the server as sent
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**body)
        error = info.value.body
    else:
        status, answer = _raw(setup["url"] + "/chat/completions", json.dumps(body).encode())
        assert status == 400
        error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_not_json_is_400(setup):
    status, body = _raw(setup["url"] + "/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"


def test_requests_for_different_adapters_share_a_batch(setup, client):
    engine = setup["engine"]
    names = [engine.base_name, "alpha", "beta", "alpha"]
    limits = [12, 12, 5, 9]
    alone = [_chat(client, n, max_tokens=m).choices[0].message.content for n, m in zip(names, limits)]
    with engine.batcher.lock:  # the worker waits, so all four are queued before the batch starts
        engine.batcher.largest_batch = 0  # a running maximum: earlier tests' batches do not count
        gens = [engine.generate(n, MESSAGES, temperature=0, max_tokens=m)
                for n, m in zip(names, limits)]
    together = ["".join(g) for g in gens]
    assert engine.batcher.largest_batch >= 4  # all four in one batch (a row left by another may join)
    assert together == alone
    assert [g.result.completion_tokens <= m for g, m in zip(gens, limits)] == [True] * 4
    assert gens[2].result.completion_tokens == 5 and gens[2].result.finish_reason == "length"


def test_a_request_joins_a_running_batch_and_answers_as_alone(setup, client):
    """Continuous batching: B arrives while A is generating, joins at the next step (its cache
    left-padded beside A's), A goes on, and both answer exactly as each does alone."""
    engine = setup["engine"]
    alone_a = _chat(client, "alpha", max_tokens=40).choices[0].message.content
    other = [{"role": "user", "content": "Tell me about the sea, briefly please."}]
    alone_b = "".join(engine.generate("beta", other, temperature=0, max_tokens=10))
    before = engine.batcher.joined_running
    a = engine.generate("alpha", MESSAGES, temperature=0, max_tokens=40)
    pieces = iter(a)
    first = next(pieces)  # A is running now
    b = engine.generate("beta", other, temperature=0, max_tokens=10)
    text_b = "".join(b)
    text_a = first + "".join(pieces)
    assert engine.batcher.joined_running == before + 1  # A was still generating when B joined
    assert text_a == alone_a and text_b == alone_b
    assert b.result.completion_tokens <= 10


def test_concurrent_streams_over_http(setup):
    from concurrent.futures import ThreadPoolExecutor

    def ask(name):
        c = openai.OpenAI(base_url=setup["url"], api_key=KEY, max_retries=0)
        return "".join(ch.choices[0].delta.content or "" for ch in
                       _chat(c, name, stream=True) if ch.choices)

    names = ["alpha", "beta", setup["engine"].base_name] * 2
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, names))
    assert got[:3] == got[3:]
    assert len(set(got[:3])) == 3


def test_generation_failure_is_a_json_500_and_the_server_lives_on(setup, client, monkeypatch):
    def boom(*args):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(setup["engine"].batcher, "_forward", boom)
    with pytest.raises(openai.InternalServerError) as info:
        client.with_options(max_retries=0).chat.completions.create(
            model="alpha", messages=MESSAGES, max_tokens=2)
    assert info.value.body["type"] == "server_error" and "Traceback" not in str(info.value.body)
    monkeypatch.undo()
    assert _chat(client, "alpha", max_tokens=2).usage.completion_tokens <= 2
