"""A client that disconnects stops its generation: streamed or not, for every choice of n, and
while still queued. The model is served with a context of a million tokens and no max_tokens is
sent, so a generation nobody stops would run far past every wait here."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

import pytest

from tuneforge.api.server import BackgroundServer
from tuneforge.infer.engine import Engine

ASK = [{"role": "user", "content": "Hello there, how are you?"}]


def _engine(model_dir, **kw) -> Engine:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return Engine(AutoModelForCausalLM.from_pretrained(model_dir),
                  AutoTokenizer.from_pretrained(model_dir), base_name="tiny", context=1_000_000, **kw)


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    with BackgroundServer(engine) as url:
        yield engine, urlsplit(url)


def _until(condition, what: str, engine, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what}: {engine.batcher.stats()}"
        time.sleep(0.01)


def _ask(url, **body) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "tiny", "messages": ASK, "temperature": 0, **body}),
                 {"Content-Type": "application/json"})
    return conn


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_generation_stops_when_the_client_disconnects(served, stream, n):
    engine, url = served
    stopped = engine.batcher.counts["stopped"]
    conn = _ask(url, stream=stream, n=n)
    _until(lambda: engine.batcher.stats()["rows"] == n, "the choices did not start", engine)
    response = None
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        seen = set()
        while len(seen) < n:  # content from every choice: all of them are generating
            line = response.fp.readline()
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("content"):
                        seen.add(choice["index"])
    conn.close()
    if response is not None:
        response.close()
    _until(lambda: engine.batcher.stats()["live"] == 0, "generation outlived its client", engine)
    assert engine.batcher.counts["stopped"] == stopped + n  # stopped, not finished


def test_a_queued_request_whose_client_left_never_starts(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_batch_size=1)
    with BackgroundServer(engine) as url:
        url = urlsplit(url)
        running = _ask(url)
        _until(lambda: engine.batcher.stats()["rows"] == 1, "the first did not start", engine)
        queued = _ask(url, stream=True)
        _until(lambda: engine.batcher.stats()["live"] == 2, "the second was not queued", engine)
        queued.close()
        _until(lambda: engine.batcher.stats()["stopping"] == 1, "the server missed the disconnect", engine)
        running.close()
        _until(lambda: engine.batcher.stats()["live"] == 0, "generation outlived its client", engine)
    assert engine.batcher.admitted == 1  # the queued one was dropped without a step
    assert engine.batcher.counts["stopped"] == 2 and engine.batcher.counts["finished"] == 0
