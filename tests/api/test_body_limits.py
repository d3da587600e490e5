"""Request bodies within limits (api/limits.py), on the real uvicorn server: a body that stalls is
a 408 after API_BODY_TIMEOUT and its connection closed, one over API_MAX_BODY_MB a 413 (declared
or streamed in chunks), and requests beside them are answered as usual."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from tuneforge.api.limits import body_limits
from tuneforge.api.server import BackgroundServer
from tuneforge.errors import ConfigError
from tuneforge.infer.engine import Engine

ASK = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("API_BODY_TIMEOUT", "1.5")
    mp.setenv("API_MAX_BODY_MB", "0.01")  # 10485 bytes
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir), base_name="tiny")
    try:
        with BackgroundServer(engine) as url:
            yield urlsplit(url)
    finally:
        mp.undo()


def _send(url, head: bytes, body: bytes = b"") -> socket.socket:
    conn = socket.create_connection((url.hostname, url.port), timeout=30)
    conn.sendall(head + body)
    return conn


def _head(length: int | str, chunked: bool = False) -> bytes:
    size = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{size}\r\n\r\n").encode()


def _answer(conn: socket.socket) -> tuple[int, dict, bool]:
    """(status, JSON body, whether the server closed the connection after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += conn.recv(65536)
    closed = conn.recv(1) == b""
    return int(head.split()[1]), json.loads(rest[:length]), closed


def test_a_stalled_body_is_408_and_others_are_served(served):
    start = time.monotonic()
    stalled = _send(served, _head(100), b'{"model": "t')
    ok = _send(served, _head(len(json.dumps(ASK))), json.dumps(ASK).encode())
    status, body, _ = _answer(ok)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    status, body, closed = _answer(stalled)
    assert status == 408 and closed and 1.4 < time.monotonic() - start < 20
    assert body["error"] == {"message": "the request body stopped arriving (nothing for 1.5 s); send the "
                             "whole body at once", "type": "invalid_request_error", "param": None,
                             "code": "request_timeout"}


@pytest.mark.parametrize("how", ["declared", "chunked", "trickled"])
def test_a_body_over_the_limit_is_413(served, how):
    big = json.dumps({**ASK, "messages": [{"role": "user", "content": "x" * 20000}]}).encode()
    if how == "declared":  # refused from Content-Length alone, before any byte of the body
        conn = _send(served, _head(len(big)))
    elif how == "chunked":
        conn = _send(served, _head(0, chunked=True),
                     b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                              for part in (big[i:i + 4096] for i in range(0, len(big), 4096))) + b"0\r\n\r\n")
    else:  # within the timeout each time, but more than the limit in all
        conn = _send(served, _head(0, chunked=True))
        for i in range(0, len(big), 4096):
            part = big[i:i + 4096]
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            except OSError:
                break  # the server answered and closed
            time.sleep(0.05)
    status, body, closed = _answer(conn)
    assert status == 413 and closed
    assert body["error"]["message"] == ("the request body is larger than 10.2 KB, the server's limit "
                                        "(API_MAX_BODY_MB); send a shorter request")


def test_a_body_at_the_limit_is_read(served):
    body = json.dumps(ASK).encode()
    body += b" " * (int(0.01 * 2**20) - len(body))  # trailing spaces: still valid JSON
    status, answer, _ = _answer(_send(served, _head(len(body)), body))
    assert status == 200, answer


@pytest.mark.parametrize("name,value,unit", [("API_MAX_BODY_MB", "0", "MB"), ("API_MAX_BODY_MB", "big", "MB"),
                                             ("API_BODY_TIMEOUT", "-1", "seconds"),
                                             ("API_BODY_TIMEOUT", "inf", "seconds")])
def test_bad_limits_in_the_environment_are_one_line(monkeypatch, name, value, unit):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        body_limits()
    assert str(info.value) == f"environment variable {name} must be a number of {unit} > 0; got {value!r}"
