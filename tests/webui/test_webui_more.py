"""The web UI's second pass, without a browser: Chinese help of every registry key the Train tab
can show, the device count (FORCE_TORCHRUN / NPROC_PER_NODE) of a page run, and the safety of a
page served beyond this machine (the warning line, Save / Load kept inside the allowed folders)."""

from __future__ import annotations

import re

import pytest

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


def test_device_count_sets_the_launcher_env_and_the_previewed_command():
    from tuneforge.distributed import launch
    from tuneforge.errors import ConfigError
    from tuneforge.webui import command

    path = "saves/.webui/r/train.yaml"
    assert command.command_line(path, 1) == command.command_line(path, "") == f"tuneforge train {path}"
    assert command.launch_env(1) == {}
    assert command.command_line(path, 2.0) == f"FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tuneforge train {path}"
    env = command.launch_env(4)
    assert env == {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "4"}
    # the launcher the CLI runs reads them: 4 processes under torchrun on a machine without accelerators
    assert launch.needs_torchrun(env, devices=0)
    argv = launch.torchrun_command(["train", path], env, devices=0)
    assert argv[argv.index("--nproc_per_node") + 1] == "4" and argv[-3:] == ["tuneforge", "train", path]
    for bad in (0, 1.5, "two", -2):
        with pytest.raises(ConfigError, match="device count .* must be a whole number of 1 or more"):
            command.launch_env(bad)


def test_preview_and_start_use_the_device_count(tmp_path, monkeypatch):
    import subprocess

    from tuneforge.webui import runner as runner_module
    from tuneforge.webui import train_actions
    from tuneforge.webui.runner import Runner

    form = {"stage": "sft", "finetuning_type": "lora", "dataset": ["identity"], "cutoff_len": 64,
            "output_dir": str(tmp_path / "out")}
    line, _, status = train_actions.preview(form, {}, "en", 2)
    assert line.startswith("FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tuneforge train ") and status == "the config is valid"
    line, _, status = train_actions.preview(form, {}, "en", 0)
    assert line.startswith("tuneforge train ") and status.startswith("tuneforge: error: device count 0 ")
    started = []

    class Process:  # stands for the training subprocess: its command and environment are checked
        def __init__(self, argv, env, **kwargs):
            started.append((argv, env))

        def poll(self):
            return None

    monkeypatch.setattr(subprocess, "Popen", Process)
    runner = Runner()
    assert train_actions.start(runner, form, {}, "en", 0)[0] is False and not started
    ok, line, _ = train_actions.start(runner, form, {}, "en", 3)
    argv, env = started[0]
    assert ok and line == runner.current.command and line.startswith("FORCE_TORCHRUN=1 NPROC_PER_NODE=3 tuneforge")
    assert argv[1:4] == ["-m", "tuneforge", "train"] and env["FORCE_TORCHRUN"] == "1" and env["NPROC_PER_NODE"] == "3"
    runner.current = None
    monkeypatch.delenv("FORCE_TORCHRUN", raising=False)
    runner.start(train_actions.form_config(form), 1)
    assert "FORCE_TORCHRUN" not in started[1][1] and runner.current.command == command_of(runner_module, form)


def command_of(runner_module, form) -> str:
    return f"tuneforge train {runner_module.run_files(form['output_dir'])[0]}"


def test_save_and_load_stay_inside_the_current_directory_and_the_output_root(tmp_path, monkeypatch):
    from tuneforge.webui import paths, train_actions

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (elsewhere / "runs").mkdir(parents=True)
    work.mkdir()
    (work / "saves").symlink_to(elsewhere / "runs")  # an output root on another disk is allowed
    (work / "escape").symlink_to(elsewhere)  # a link out of the current directory is not
    monkeypatch.chdir(work)
    roots = paths.allowed_roots()
    assert roots == (work.resolve(), (elsewhere / "runs").resolve())
    assert paths.allowed_roots("sub") == (work.resolve(),)
    form = {"stage": "sft", "finetuning_type": "lora", "dataset": ["identity"], "output_dir": "saves/r"}
    for good in ("args.yaml", "sub/args.yaml", "saves/args.yaml", str(work / "a.yaml")):
        assert train_actions.save(form, {}, good, "en", roots).startswith("arguments saved to "), good
        values, _, status = train_actions.load(good, ["stage", "dataset"], "en", roots)
        assert values == ["sft", ["identity"]] and status.startswith("arguments loaded from "), good
    (elsewhere / "secret.yaml").write_text("stage: dpo\n")
    for bad in ("../elsewhere/secret.yaml", "escape/secret.yaml", str(elsewhere / "secret.yaml"), "/etc/x.yaml"):
        line = train_actions.save(form, {}, bad, "en", roots)
        assert line == f"'{bad}' is outside the folders the page may read and write ({roots[0]}, {roots[1]}): " \
                       "give a path inside one of them", bad
        values, extra, status = train_actions.load(bad, ["stage"], "zh", roots)
        assert values == [None] and extra == {} and status.startswith(f"“{bad}” 不在页面可读写的文件夹内"), bad
    assert (elsewhere / "secret.yaml").read_text() == "stage: dpo\n" and not (tmp_path / "etc").exists()


def test_serving_beyond_this_machine_logs_a_warning(monkeypatch, caplog):
    from tuneforge.webui import app as app_module
    from tuneforge.webui import paths

    assert not any(paths.exposed(h) for h in (None, "", "127.0.0.1", "localhost", "::1"))
    assert all(paths.exposed(h) for h in ("0.0.0.0", "192.168.1.5", "::"))

    class Page:  # stands for the gr.Blocks: nothing is served
        def queue(self):
            pass

        def launch(self, **kwargs):
            self.kwargs = kwargs

    built = []
    monkeypatch.setattr(app_module, "build_app", lambda lang, roots: built.append(roots) or Page())
    monkeypatch.setattr(app_module, "theme", lambda: None)
    with caplog.at_level("WARNING", logger="tuneforge"):
        page = app_module.launch(host="0.0.0.0", port=1, block=False)
        assert page.kwargs["server_name"] == "0.0.0.0"
        app_module.launch(port=1, block=False)
    roots = paths.allowed_roots()
    assert built == [roots, None]  # Save / Load confined when served beyond this machine only
    warnings = [r.getMessage() for r in caplog.records if r.name == "tuneforge"]
    assert warnings == [paths.EXPOSED_WARNING.format(host="0.0.0.0", roots=" and ".join(map(str, roots)))]
    assert "read and write files wherever this server's user can" in warnings[0]


def test_preview_checks_the_dataset_and_writes_the_file_its_line_names(tmp_path, shared_data_dir):
    """Preview's line runs as shown (the YAML is written where it says), and no dataset is the run's
    own one-line refusal, not 'valid'."""
    from tuneforge.webui import train_actions

    form = {"stage": "sft", "finetuning_type": "lora", "dataset": [], "dataset_dir": str(shared_data_dir),
            "cutoff_len": 64, "output_dir": str(tmp_path / "out")}
    line, _, status = train_actions.preview(form, {}, "en")
    assert status.startswith("tuneforge: error: no dataset given")
    form["dataset"] = ["identity"]
    line, yaml_text, status = train_actions.preview(form, {}, "en")
    assert status == "the config is valid"
    written = line.split(" ")[-1]
    assert line.startswith("tuneforge train ") and open(written, encoding="utf-8").read() == yaml_text
