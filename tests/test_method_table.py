"""The torch-free method table (tuneforge/adapter_methods.py) agrees with the method registry, and
each method's own YAML keys (METHOD_KEYS) load with a method that reads them and are refused, in one
line, for a method that does not."""

from __future__ import annotations

import pytest

from tuneforge.adapter_methods import METHOD_KEYS, METHOD_SELECTORS, METHODS
from tuneforge.config import describe_keys, load_config
from tuneforge.errors import ConfigError


def test_the_table_lists_exactly_the_registered_methods():
    from tuneforge.adapters.methods import method_names

    assert method_names() == list(METHODS)


@pytest.mark.parametrize("key", list(METHOD_KEYS))
def test_a_method_key_belongs_to_its_methods(key):
    spec = METHOD_KEYS[key]
    assert spec["methods"] and set(spec["methods"]) <= set(METHODS), spec["methods"]
    assert f"  {key} (default: " in describe_keys()
    for method in spec["methods"]:  # the default loads with every method that reads the key
        cfg = load_config(None, {"finetuning_type": method, key: spec["default"]})
        assert getattr(cfg.finetune, key) == spec["default"]
    refined = {refines for refines, _ in METHOD_SELECTORS.get(key, {}).values()}  # lora for adaptive: moe
    other = next(m for m in ("lora", "ia3", "loha") if m not in spec["methods"] and m not in refined)
    value = spec["default"] if spec["default"] is not None else spec["choices"][0] if spec["choices"] else (
        "x" if "str" in spec["type"] else {"x": 1} if "dict" in spec["type"] else 1)
    with pytest.raises(ConfigError) as refused:
        load_config(None, {"finetuning_type": other, key: value})
    assert str(refused.value).startswith(f"config key '{key}' needs finetuning_type: ")
    assert str(refused.value).endswith(f"(got finetuning_type: {other})")


def test_a_method_key_is_read_by_exactly_the_methods_it_names():
    """METHOD_KEYS (torch-free, read by config validation) and each method's `keys` (read by
    train.methods.refuse_unread_keys) say the same."""
    from tuneforge.adapters.methods import all_methods

    for key, spec in METHOD_KEYS.items():
        assert set(spec["methods"]) == {m.name for m in all_methods() if key in m.keys}, key
