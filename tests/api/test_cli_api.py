"""`tuneforge api` as a user starts it: a subprocess on a free port, API_KEY from the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_the_model(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "API_KEY": "k", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "api", f"model_name_or_path={tiny_model_dir}",
         "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                ids = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert ids == [tiny_model_dir.name]
        out = client.chat.completions.create(model=ids[0], max_tokens=3, temperature=0,
                                             messages=[{"role": "user", "content": "hi"}])
        assert out.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                          max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_missing_adapter_is_one_line(tiny_model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tuneforge", "api", f"model_name_or_path={tiny_model_dir}",
                        f"adapter_name_or_path={tmp_path / 'nope'}"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
