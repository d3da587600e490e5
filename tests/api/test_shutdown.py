"""SIGTERM drains `tuneforge api` (a real subprocess): it stops accepting at once, lets running
generations finish within API_DRAIN_TIMEOUT, stops the rest (a 503 for a waiting request, an
in-band error for a stream), and exits even while a generation would otherwise run for ever."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ASK = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def endless_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a context of a million tokens: with no max_tokens it does not stop."""
    path = tmp_path_factory.mktemp("endless") / "endless"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 1_000_000
    (path / "config.json").write_text(json.dumps(config))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model, drain: str):
    port = _free_port()
    env = {**os.environ, "API_DRAIN_TIMEOUT": drain, "OMP_NUM_THREADS": "1"}
    env.pop("API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "api", f"model_name_or_path={model}",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
            return proc, port
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


def _ask(port, **body) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "endless", "messages": ASK, "temperature": 0, **body}),
                 {"Content-Type": "application/json"})
    return conn


def _exited(proc) -> str:
    proc.wait(timeout=60)
    output = proc.stdout.read()
    assert proc.returncode in (0, -signal.SIGTERM), output  # 143 in a shell: killed by its own SIGTERM
    assert "Traceback" not in output, output
    return output


def test_sigterm_stops_endless_generations_and_exits(endless_model):
    proc, port = _start(endless_model, drain="1")
    try:
        waiting = _ask(port)         # not streamed: waits for the whole answer
        streamed = _ask(port, stream=True, n=2)
        stream = streamed.getresponse()
        while b'"content":"' not in (line := stream.readline()) or b'"content":""' in line:
            assert line, "the stream ended before any content"
        proc.send_signal(signal.SIGTERM)
        rest = stream.read().decode()                    # until the server closes the stream
        events = [json.loads(e[6:]) for e in rest.split("\n\n") if e.startswith("data: {")]
        assert events[-1]["error"]["code"] == "server_shutting_down"
        assert "[DONE]" not in rest
        answer = waiting.getresponse()
        body = json.loads(answer.read())
        assert answer.status == 503 and body["error"]["code"] == "server_shutting_down"
        try:  # a new request now: refused, or answered 503 if it slipped in before the close
            late = _ask(port).getresponse()
            assert late.status == 503
        except (ConnectionError, http.client.RemoteDisconnected):
            pass
        _exited(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_lets_a_short_generation_finish(endless_model):
    proc, port = _start(endless_model, drain="60")
    try:
        conn = _ask(port, max_tokens=300, stream=True)
        stream = conn.getresponse()
        stream.readline()  # the role chunk: it is running
        proc.send_signal(signal.SIGTERM)
        text = stream.read().decode()
        assert text.rstrip().endswith("data: [DONE]")
        finish = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")][-1]
        assert finish["choices"][0]["finish_reason"] == "length"
        assert finish["usage"]["completion_tokens"] == 300
        _exited(proc)  # and it went at once, not after the 60 s it could have waited
    finally:
        if proc.poll() is None:
            proc.kill()
