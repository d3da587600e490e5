"""Shared fixtures for tests/adapters (helpers live in adapter_testkit.py)."""

import os
import sys
import warnings

import pytest

# the helpers module sits beside this file; make it importable under any pytest import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*bos_token_id.*")
        yield
