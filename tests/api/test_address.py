"""Where `tuneforge api` listens and how long it drains: bad values are one line naming where
they came from (flag, config key, environment), and an address it cannot listen on too."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tuneforge.api.server import listen, resolve_address, resolve_drain_timeout
from tuneforge.config import load_config
from tuneforge.errors import ConfigError


@pytest.fixture
def plain(monkeypatch):
    for name in ("API_HOST", "API_PORT", "API_KEY", "API_DRAIN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return load_config(None, {}).serve


@pytest.mark.parametrize("flag,env,message", [
    (70000, None, "--port must be a port number (1-65535); got 70000"),
    (-1, None, "--port must be a port number (1-65535); got -1"),
    (0, None, "--port must be a port number (1-65535); got 0"),
    (None, "99999", "environment variable API_PORT must be a port number (1-65535); got 99999"),
    (None, "http", "environment variable API_PORT must be a port number; got 'http'"),
])
def test_bad_port_is_one_line_naming_its_source(plain, monkeypatch, flag, env, message):
    if env is not None:
        monkeypatch.setenv("API_PORT", env)
    with pytest.raises(ConfigError) as info:
        resolve_address(plain, None, flag)
    assert str(info.value) == message


@pytest.mark.parametrize("value,expected", [(None, 10.0), ("0", 0.0), ("2.5", 2.5)])
def test_drain_timeout_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("API_DRAIN_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("API_DRAIN_TIMEOUT", value)
    assert resolve_drain_timeout() == expected


@pytest.mark.parametrize("value", ["-1", "soon", "inf", "nan"])
def test_bad_drain_timeout_is_one_line(monkeypatch, value):
    monkeypatch.setenv("API_DRAIN_TIMEOUT", value)
    with pytest.raises(ConfigError) as info:
        resolve_drain_timeout()
    assert str(info.value) == ("environment variable API_DRAIN_TIMEOUT must be a number of seconds "
                               f">= 0; got {value!r}")


def test_an_address_in_use_or_unknown_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            listen("127.0.0.1", port)
        assert str(info.value) == (f"cannot listen on 127.0.0.1:{port}: Address already in use; "
                                   "pick another --host / --port (api_host / api_port)")
    with pytest.raises(ConfigError, match=r"^cannot listen on no-such-host\.invalid:8000: unknown host"):
        listen("no-such-host.invalid", 8000)
    sock = listen("127.0.0.1", port)  # free again
    sock.close()


def test_cli_port_in_use_exits_2_with_one_line(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tuneforge", "api", f"model_name_or_path={tiny_model_dir}",
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("tuneforge: error:")]
    assert errors == [f"tuneforge: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
                      "pick another --host / --port (api_host / api_port)"]
