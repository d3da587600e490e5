"""Every malformed request gets a 4xx in OpenAI's error shape naming the field, before any
generation starts; never a 500. The table of bodies is tests/api/bad_requests.yaml. Also the
key: a malformed Authorization header is a 401, and the OpenAPI schema is behind the key."""

from __future__ import annotations

import copy
import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tuneforge.api.server import BackgroundServer
from tuneforge.infer.engine import Engine

KEY = "sesame"
BASE = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
CASES = yaml.safe_load((Path(__file__).parent / "bad_requests.yaml").read_text())
LONG_TEXT = "word " * 600


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir), base_name="tiny")
    with BackgroundServer(engine, api_key=KEY) as url:
        yield engine, urlsplit(url)


def _send(url, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest(method, path)
        for name, value in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                            **(headers or {})}.items():
            if value is not None:
                conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _generations(engine) -> int:
    stats = engine.batcher.stats()
    return stats["live"] + stats["finished"] + stats["stopped"] + stats["failed"]


def _body(case) -> bytes:
    if "raw" in case:
        return case["raw"].encode()
    body = case["body"] if case.get("whole") else {**copy.deepcopy(BASE), **case["body"]}
    return json.dumps(body).replace("{long_text}", LONG_TEXT).encode()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_request_is_refused_with_its_field(served, case):
    engine, url = served
    before = _generations(engine)
    status, raw = _send(url, "POST", "/v1/chat/completions", _body(case))
    error = json.loads(raw)["error"]
    assert (status, error["param"]) == (case["status"], case["param"])
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if "message" in case:
        assert error["message"] == case["message"]
    else:
        assert error["message"].startswith(case["message_starts"])
    assert _generations(engine) == before  # refused before anything was queued


def test_the_base_request_of_the_table_is_served(served):
    engine, url = served
    status, raw = _send(url, "POST", "/v1/chat/completions",
                        json.dumps({**BASE, "max_tokens": 2, "seed": -2**63, "stop": None,
                                    "messages": [{"role": "developer", "content": "be brief"},
                                                 {"role": "user", "content": [{"type": "text",
                                                                               "text": "hi"}]}]}).encode())
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("header", [
    None,                                   # none at all
    "Bearer wrong",
    "Basic c2VzYW1lOg==",                   # another scheme
    "Bearer",                               # no token
    "Bearer sésame".encode("utf-8"),        # not ASCII, as UTF-8 bytes
    "Bearer s\xe9same".encode("latin-1"),   # not ASCII, as Latin-1 bytes
    b"Bearer \xff\xfe\x80",                 # not text in any charset
])
def test_bad_key_is_401(served, header):
    _, url = served
    status, raw = _send(url, "GET", "/v1/models", headers={"Authorization": header})
    assert status == 401
    assert json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_a_non_ascii_key_works_when_it_is_the_key(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    AutoTokenizer.from_pretrained(tiny_model_dir))
    with BackgroundServer(engine, api_key="sésame") as url:
        url = urlsplit(url)
        ok, _ = _send(url, "GET", "/v1/models", headers={"Authorization": "Bearer sésame".encode()})
        wrong, _ = _send(url, "GET", "/v1/models", headers={"Authorization": "Bearer sesame"})
    assert (ok, wrong) == (200, 401)


def test_openapi_schema_needs_the_key_and_there_are_no_doc_pages(served):
    _, url = served
    status, raw = _send(url, "GET", "/openapi.json", headers={"Authorization": None})
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    status, raw = _send(url, "GET", "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in json.loads(raw)["paths"]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        status, raw = _send(url, "GET", page, headers={"Authorization": None})
        assert status == 404 and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/chat/completions", 405),
    ("POST", "/v1/models", 405),
    ("GET", "/v1/nothing", 404),
])
def test_wrong_route_is_an_openai_error(served, method, path, status):
    _, url = served
    got, raw = _send(url, method, path, b"{}" if method == "POST" else None)
    assert got == status and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_body_not_sent_as_json_is_refused_with_the_header_to_send(served):
    _, url = served
    status, raw = _send(url, "POST", "/v1/chat/completions", json.dumps({**BASE, "max_tokens": 1}).encode(),
                        headers={"Content-Type": "text/plain"})
    assert status == 400
    assert json.loads(raw)["error"]["message"] == (
        "the body must be JSON, sent with 'Content-Type: application/json'")


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',   # not UTF-8
    b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nested too deep
    b'{"model": "tiny", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}",    # a huge number
], ids=["not utf-8", "nested", "huge number"])
def test_body_that_cannot_be_parsed_is_a_400(served, body):
    engine, url = served
    status, raw = _send(url, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert json.loads(raw)["error"]["message"] == (
        "the body could not be read as JSON (not UTF-8, nested too deep, or a number too long)")


def test_messages_the_chat_template_refuses_are_a_400(served):
    """Many templates (Llama 2, Mistral, Gemma) raise for roles that do not alternate."""
    engine, url = served
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    try:
        status, raw = _send(url, "POST", "/v1/chat/completions", json.dumps(
            {**BASE, "messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "hi"}]}).encode())
    finally:
        engine.tokenizer.chat_template = template
    error = json.loads(raw)["error"]
    assert (status, error["param"]) == (400, "messages")
    assert error["message"] == "this model's chat template refuses the messages: System role not supported"
