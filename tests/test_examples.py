"""Every example config in examples/ loads and passes validation as shipped, so the commands the
README and each file's header give start without a config error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_config_loads(path):
    cfg = load_config(str(path))
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each example says what it shows in its first line"
    assert cfg.to_dict()
