"""The web UI served on a free local port in this process (a thread) and a headless Chromium from
Debian's `chromium` package driven by playwright (never `playwright install`). Screenshots of the
page go to tests/webui/artifacts/ (test artefacts; the README's picture is one of them)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("TUNEFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or Path(CHROMIUM).is_file(), (
        f"the browser tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium; `make test` installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def webui_app():
    """The page's server, run by this process on 127.0.0.1:<free port> (`.tf_url`): one server for
    all the browser tests (each test opens its own page; a launch costs seconds)."""
    from tuneforge.webui import launch

    port = free_port()
    app = launch(port=port, block=False)
    app.tf_url = f"http://127.0.0.1:{port}"
    yield app
    app.tuneforge_runner.shutdown()
    app.close()


@pytest.fixture(scope="session")
def webui_url(webui_app):
    return webui_app.tf_url


@pytest.fixture
def page(browser, webui_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(webui_url)
    page.wait_for_selector("#tf-start")
    yield page
    context.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def fill(page, elem_id: str, value: str) -> None:
    """Type into a gradio Textbox / Number by its elem_id and leave the field (gradio sends the
    value on change)."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number], #{elem_id} input").first
    box.fill(value)
    box.blur()


def value_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def pytest_configure(config):
    # gradio 6.31's queue calls pandas options that pandas 3 deprecates: not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:.*(no_silent_downcasting|copy keyword).*")
