"""`tuneforge api` as a user starts it: a subprocess on a free port, the key from the environment
or from the YAML config."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
import yaml

from tuneforge.api.server import resolve_address, resolve_api_key
from tuneforge.config import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args, env, port, key):
    """Start `tuneforge api` and return (process, client) once /v1/models answers."""
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "api", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.models.list()
            return proc, client
        except openai.APIConnectionError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)


def _stop(proc):
    proc.terminate()
    proc.wait(timeout=20)


def test_cli_serves_the_model(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc, client = _serve([f"model_name_or_path={tiny_model_dir}", "--port", str(port)], env, port, "k")
    try:
        ids = [m.id for m in client.models.list().data]
        assert ids == [tiny_model_dir.name]
        out = client.chat.completions.create(model=ids[0], max_tokens=3, temperature=0,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                          max_retries=0).models.list()
    finally:
        _stop(proc)


def test_cli_takes_key_and_port_from_the_yaml(tiny_model_dir, tmp_path):
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "api_key": "from-yaml",
                                   "api_port": port}))
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_PORT", "API_HOST")}
    proc, client = _serve([str(cfg)], {**env, "OMP_NUM_THREADS": "1"}, port, "from-yaml")
    try:
        assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                          max_retries=0).models.list()
        with pytest.raises(urllib.error.HTTPError) as no_header:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert no_header.value.code == 401
    finally:
        _stop(proc)


def test_address_and_key_precedence(monkeypatch):
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.delenv("API_HOST", raising=False)
    monkeypatch.delenv("API_PORT", raising=False)
    plain = load_config(None, {}).serve
    assert resolve_address(plain) == ("127.0.0.1", 8000)  # local only by default
    assert resolve_api_key(plain) is None
    monkeypatch.setenv("API_KEY", "env-key")
    monkeypatch.setenv("API_HOST", "0.0.0.0")
    monkeypatch.setenv("API_PORT", "9000")
    assert resolve_address(plain) == ("0.0.0.0", 9000)
    assert resolve_api_key(plain) == "env-key"
    configured = load_config(None, {"api_key": "cfg-key", "api_host": "10.0.0.1", "api_port": 9100}).serve
    assert resolve_api_key(configured) == "cfg-key"
    assert resolve_address(configured) == ("10.0.0.1", 9100)
    assert resolve_address(configured, "127.0.0.1", 7000) == ("127.0.0.1", 7000)  # flags win


def test_api_key_is_not_written_with_a_run(tmp_path):
    from tuneforge.config import save_config

    save_config(load_config(None, {"api_key": "secret"}), tmp_path / "args.yaml")
    assert "secret" not in (tmp_path / "args.yaml").read_text()


def test_bad_api_port_is_one_line():
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="api_port"):
        load_config(None, {"api_port": 70000})


def test_cli_missing_adapter_is_one_line(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tuneforge", "api", f"model_name_or_path={tiny_model_dir}",
                        f"adapter_name_or_path={tmp_path / 'nope'}"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
