"""The web UI's parts without a browser: the i18n table, the options read from the registry, the
YAML and command the form becomes, the config check's CLI lines, progress from a run's log."""

from __future__ import annotations

import json
import re

import pytest

from tuneforge.adapter_methods import METHOD_KEYS
from tuneforge.train.plot import smooth
from tuneforge.train.stages import STAGES
from tuneforge.webui import command, i18n, options, progress, train_actions


def test_every_text_has_english_and_chinese():
    for key, texts in i18n.TEXTS.items():
        assert set(texts) == set(i18n.LANGS), key
        assert all(t.strip() for t in texts.values()), key
        assert set(re.findall(r"{(\w+)}", texts["en"])) == set(re.findall(r"{(\w+)}", texts["zh"])), key
        assert texts["en"] != texts["zh"], key


def test_every_text_the_page_uses_is_in_the_table():
    """Each i18n key the modules name (text("..."), labels.field("..."), "btn.*") exists."""
    from pathlib import Path

    import tuneforge.webui as pkg

    from tuneforge.webui import train_tab

    used = {train_tab.label_key(k) for k in options.MAIN_KEYS}
    for path in Path(pkg.__file__).parent.glob("*.py"):
        source = path.read_text()
        used |= set(re.findall(r'(?:\btext|\bhas|labels\.field)\(\s*"([a-z_.]+)"', source))
        used |= {f"btn.{k}" for k in re.findall(r'\("(\w+)", "(?:secondary|primary|stop)"\)', source)}
    missing = sorted(k for k in used if k not in i18n.TEXTS)
    assert not missing and len(used) > 40


def test_options_come_from_the_registry():
    for name, spec in METHOD_KEYS.items():
        for method in spec["methods"]:
            assert name in options.method_keys(method)
    for stage in STAGES.values():
        assert options.stage_keys(stage.name) == list(stage.keys)
    assert "use_dora" in options.method_keys("lora") and "use_dora" not in options.method_keys("ia3")
    assert options.method_keys("full") == []
    assert options.spec("pref_loss").choices == ("sigmoid", "ipo", "hinge", "orpo", "simpo")
    assert "Range: (0, inf)" in options.spec("lora_rank").help


def test_form_becomes_the_yaml_of_the_chosen_method_only():
    form = {"model_name_or_path": "", "stage": "sft", "finetuning_type": "lora", "dataset": ["a", "b"],
            "cutoff_len": 2048.0, "lora_rank": 4.0, "lora_alpha": 8.0, "learning_rate": 5e-4,
            "output_dir": "saves/x", "use_dora": True, "vera_rank": 64, "lora_target": "q_proj,v_proj",
            "resume_from_checkpoint": "", "ensemble": "[{r: 4}, {r: 16}]"}
    values = train_actions.form_config(form, {"seed": 3})
    assert values == {"stage": "sft", "finetuning_type": "lora", "dataset": "a,b", "lora_rank": 4,
                      "lora_alpha": 8.0, "learning_rate": 5e-4, "output_dir": "saves/x", "use_dora": True,
                      "lora_target": "q_proj,v_proj", "seed": 3}
    assert isinstance(values["lora_rank"], int)
    form["finetuning_type"] = "lora_ensemble"
    assert train_actions.form_config(form)["ensemble"] == [{"r": 4}, {"r": 16}]
    form["finetuning_type"] = "full"
    assert not {"lora_rank", "lora_alpha", "use_dora", "lora_target"} & set(train_actions.form_config(form))
    assert command.command_line("saves/.webui/my run/train.yaml") == "tuneforge train 'saves/.webui/my run/train.yaml'"


def test_config_check_gives_the_cli_lines():
    assert command.check({"stage": "sft", "cutoff_len": 8}) == []
    lines = command.check({"cutoff_len": 0, "lora_rankk": 4})
    assert len(lines) == 2 and all(line.startswith("tuneforge: error: ") for line in lines)
    assert any("cutoff_len" in line for line in lines) and any("lora_rankk" in line for line in lines)


def test_load_puts_other_keys_aside(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("lora_rank: 16\nseed: 7\ndataset: x,y\n")
    keys = ["lora_rank", "lora_alpha", "dataset", "stage"]
    form, extra, status = train_actions.load(str(path), keys, "zh")
    assert form == [16, 32, ["x", "y"], "sft"] and extra == {"seed": 7} and "seed" in status
    path.write_text("dataset: [x, y]\n")
    assert train_actions.load(str(path), keys, "en")[0][2] == ["x", "y"]
    form, extra, status = train_actions.load(str(tmp_path / "missing.yaml"), keys, "en")
    assert status == f"tuneforge: error: config file '{tmp_path / 'missing.yaml'}' does not exist"


def test_progress_from_the_log(tmp_path):
    entries = [{"current_steps": s, "total_steps": 4, "loss": 2.0 / s, "lr": 1e-4, "tokens_per_second": 99.4,
                "remaining_time": "0:00:0{}".format(4 - s)} for s in (1, 2, 3)]
    entries.insert(1, {"current_steps": 1, "total_steps": 4, "eval_loss": 3.0})
    (tmp_path / "trainer_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"cut')
    assert progress.progress_line(tmp_path) == "step 3/4 · loss 0.6667 · lr 1.00e-04 · 99 tokens/s · ETA 0:00:01"
    assert progress.progress_line(tmp_path, "zh").startswith("步数 3/4")
    frame = progress.loss_points(tmp_path)
    raw = frame[frame.series == "original"]
    smoothed = frame[frame.series == "smoothed"]
    assert list(raw.loss) == [2.0, 1.0, 2.0 / 3]
    assert list(smoothed.loss) == pytest.approx(smooth([2.0, 1.0, 2.0 / 3]))
    assert progress.progress_line(tmp_path / "none") == "" and progress.loss_points(None).empty


def test_log_tail_and_error_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("a\ntrain: 1/2\rtrain: 2/2\ntuneforge: error: dataset 'x' is not in 'd'\n")
    assert progress.log_tail(log, 2) == "train: 2/2\ntuneforge: error: dataset 'x' is not in 'd'"
    assert progress.error_lines(log) == ["tuneforge: error: dataset 'x' is not in 'd'"]


def test_cli_webui_binds_localhost_and_needs_gradio(monkeypatch, capsys):
    import importlib.util

    import tuneforge.webui as webui
    from tuneforge.cli import main

    calls = []
    monkeypatch.setattr(webui, "launch", lambda **kw: calls.append(kw))
    assert main(["webui", "--port", "7999", "--lang", "zh"]) == 0
    assert calls == [{"host": "127.0.0.1", "port": 7999, "lang": "zh"}]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["webui"]) == 2
    assert capsys.readouterr().err.strip() == ("tuneforge: error: tuneforge webui needs gradio, which is not "
                                               "installed: pip install 'tuneforge[webui]'")


def test_save_then_load_gives_the_same_arguments(tmp_path):
    form = {"stage": "dpo", "finetuning_type": "lora", "dataset": ["dpo_en_demo"], "lora_rank": 16,
            "pref_beta": 0.2, "pref_loss": "sigmoid", "output_dir": "saves/d"}
    path = tmp_path / "sub" / "args.yaml"
    assert train_actions.save(form, {"seed": 1}, str(path), "en") == f"arguments saved to {path}"
    keys = list(form)
    values, extra, _ = train_actions.load(str(path), keys, "en")
    assert dict(zip(keys, values)) == {**form, "pref_loss": "sigmoid"} and extra == {"seed": 1}
    assert "pref_loss" not in path.read_text()  # at its default: left out
    assert train_actions.save(form, {}, "", "zh") == "请先填写参数文件路径"
