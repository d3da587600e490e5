"""LLaMA-Factory's keys tuneforge does not have (tuneforge/lf_keys.py): each refused in one line
naming its feature (never "unknown key", never a spelling guess), accepted at the value that
changes nothing, and a config's blockers reported together."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge import lf_keys
from tuneforge.config import Config, all_fields, build_config, load_config
from tuneforge.errors import ConfigError, ConfigErrors


def test_rows_are_keys_tuneforge_lacks():
    """A row whose key tuneforge now implements must go (the table would shadow nothing, but
    README's list would still call the feature unsupported); every row names a known feature."""
    landed = sorted(set(lf_keys.LF_KEYS) & set(all_fields()))
    assert not landed, f"remove these rows from tuneforge/lf_keys.py, tuneforge has the keys now: {landed}"
    assert not set(lf_keys.LF_KEYS) & set(lf_keys.KEY_ALIASES)
    for key, row in lf_keys.LF_KEYS.items():
        assert row[0] in lf_keys.FEATURES, key
        assert len(row) in (2, 3), key


@pytest.mark.parametrize("key", sorted(lf_keys.LF_KEYS))
def test_every_row_is_refused_by_name(key):
    value = "__not_the_default__"
    with pytest.raises(ConfigError) as err:
        load_config(None, {key: value})
    what = lf_keys.FEATURES[lf_keys.LF_KEYS[key][0]][0].replace("{value}", value)
    assert str(err.value).startswith(f"config key '{key}': {what}, not supported by tuneforge; ")
    assert "unknown" not in str(err.value) and "did you mean" not in str(err.value)


def test_keys_at_their_inert_default_are_accepted_and_change_nothing(caplog):
    inert = {k: row[1] for k, row in lf_keys.LF_KEYS.items() if row[1] is not lf_keys.REFUSED}
    assert {"use_kt": False, "quantization_method": "bnb", "preprocessing_batch_size": 1000}.items() <= inert.items()
    with caplog.at_level("INFO", logger="tuneforge"):
        cfg = build_config(dict(inert))
    assert cfg == Config()
    assert "use_kt" in caplog.text  # the info line names what was accepted
    # a bool is not a number: use_kv_cache: 1 is no default
    with pytest.raises(ConfigError, match="config key 'use_kv_cache': LLaMA-Factory's switch"):
        build_config({"use_kv_cache": 1})


def test_no_spelling_guess_at_a_key_the_config_sets():
    """`use_unsloth` is not a typo of use_dora, `quantization_method` not one of quantization_bit;
    a real typo still gets its guess, but never a key the config already sets."""
    with pytest.raises(ConfigError) as err:
        build_config({"use_unsloth": True, "use_dora": True})
    assert "did you mean" not in str(err.value) and "Unsloth" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({"quantization_method": "gptq", "quantization_bit": 4})
    assert str(err.value).startswith("config key 'quantization_method': LLaMA-Factory's on-the-fly quantization "
                                      "with gptq, not supported by tuneforge")
    with pytest.raises(ConfigError, match=r"did you mean 'learning_rate'\?"):
        build_config({"learning_rat": 1e-4})
    with pytest.raises(ConfigError) as err:
        build_config({"learning_rat": 1e-4, "learning_rate": 1e-4})
    assert "did you mean 'learning_rate'" not in str(err.value)


def test_a_config_is_checked_whole():
    """Unknown keys, LLaMA-Factory's keys, bad values and bad combinations: one line each, in
    the order met; one ConfigError with .messages (the CLI prints each on its own line)."""
    with pytest.raises(ConfigErrors) as err:
        build_config({"mixture_of_depths": "convert", "lora_rank": 0, "bf16": True, "fp16": True, "zzz_unknown": 8,
                      "image_max_pixels": 589824, "pissa_convert": True})
    lines = err.value.messages
    assert lines == [
        "config key 'mixture_of_depths': LLaMA-Factory's Mixture-of-Depths conversion, not supported by tuneforge; "
        "remove it",
        "unknown config key 'zzz_unknown'",
        "config key 'image_max_pixels': LLaMA-Factory's multimodal (image, video, audio) training, not supported "
        "by tuneforge; remove it (tuneforge trains on text only)",
        "config key 'lora_rank' must be positive; got 0",
        "config keys 'bf16' and 'fp16' are both true; choose one",
        "config key 'pissa_convert' needs pissa_init: true",
    ]
    assert str(err.value).splitlines() == lines
    # one blocker: a plain ConfigError with the message as before
    with pytest.raises(ConfigError) as one:
        build_config({"lora_rank": 0})
    assert type(one.value) is ConfigError and str(one.value) == "config key 'lora_rank' must be positive; got 0"


def test_one_line_per_key():
    """A key two checks refuse (its value, then what needs it) is named once, by the first."""
    with pytest.raises(ConfigError) as err:
        build_config({"finetuning_type": "ia3", "adaptive": "moe"})
    assert len(str(err.value).splitlines()) == 1


README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- lf-keys: generated from tuneforge/lf_keys.py by tests/test_lf_keys.py -->", "<!-- lf-keys: end -->"


def _shown(value) -> str:
    return {True: "true", False: "false", None: "null"}.get(value, str(value)) if not isinstance(value, str) \
        else (value or "''")


def readme_block() -> str:
    """README's table of LLaMA-Factory features tuneforge refuses: one row per feature, its keys
    (with the value accepted as changing nothing) and what the refusal says to do."""
    rows = ["| LLaMA-Factory feature | its keys (accepted at) | what to do |", "|---|---|---|"]
    for what, keys in lf_keys.features().items():
        todo = {lf_keys.FEATURES[lf_keys.LF_KEYS[k][0]][1] for k in keys}
        shown = []
        for key in keys:
            row = lf_keys.LF_KEYS[key]
            at = "" if row[1] is lf_keys.REFUSED else f" ({_shown(row[1])})"
            shown.append(f"`{key}`{at}" + (f": {row[2]}" if len(row) > 2 else ""))
        rows.append(f"| {what.replace('{value}', '<value>')} | {', '.join(shown)} | {'; '.join(sorted(todo))} |")
    return "\n".join([START, *rows, END])


def test_readme_lists_the_unsupported_features():
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md lacks the list; add:\n{readme_block()}"
    now = text[text.index(START):text.index(END) + len(END)]
    assert now == readme_block(), "README.md's list differs from tuneforge/lf_keys.py; replace it with the " \
        "output of `PYTHONPATH=. python tests/test_lf_keys.py`"


if __name__ == "__main__":
    print(readme_block())
