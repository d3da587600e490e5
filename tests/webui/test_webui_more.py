"""The web UI's second pass, without a browser: Chinese help of every registry key the Train tab
can show, the device count (FORCE_TORCHRUN / NPROC_PER_NODE) of a page run, and the safety of a
page served beyond this machine (the warning line, Save / Load kept inside the allowed folders)."""

from __future__ import annotations

import re

from tuneforge.webui import options
from tuneforge.webui.key_help_zh import KEY_HELP_ZH

HAN = re.compile(r"[\u4e00-\u9fff]")


def test_every_key_the_page_can_show_has_a_chinese_help():
    missing = [k for k in options.all_option_keys() if not HAN.search(KEY_HELP_ZH.get(k, ""))]
    assert not missing, "\n".join(f"key '{k}' has no Chinese help: add it to tuneforge/webui/key_help_zh.py"
                                  for k in missing)
    stale = sorted(set(KEY_HELP_ZH) - set(options.all_option_keys()))
    assert not stale, f"key_help_zh.py has keys the page does not show: {stale}"


def test_key_help_follows_the_language_and_keeps_the_range():
    en, zh = options.key_help("lora_dropout", "en"), options.key_help("lora_dropout", "zh")
    assert en == options.spec("lora_dropout").help and "Range: [0, 1)" in en
    assert HAN.search(zh) and "[0, 1)" in zh and not HAN.search(en)
    assert options.key_help("use_dora", "zh") == KEY_HELP_ZH["use_dora"]  # no bounds: no range line


def test_language_switch_updates_the_option_help_lines():
    from tuneforge.webui.labels import Labels

    labels = Labels("en")
    labels.add(object(), "pref_beta", "option")
    labels.add(object(), "dataset")
    option, field = labels.updates("zh")
    assert option == {"__type__": "update", "info": options.key_help("pref_beta", "zh")}
    assert field["label"] == "数据集"
    assert labels.updates("en")[0]["info"] == options.key_help("pref_beta", "en")
