"""Bad input through the CLI: one clear line on stderr, exit code 2, no traceback, and the
output_dir exactly as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.cli import main


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    """A config that would train, and an output_dir holding a previous run's files."""
    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(8))
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"previous run")
    config = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith",
              "dataset_dir": str(data), "output_dir": str(out), "overwrite_output_dir": True,
              "max_steps": 1, "cutoff_len": 64, "disable_tqdm": True}
    return tmp_path, data, out, config


def run_bad(capsys, tmp_path, config: dict, *overrides: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("tuneforge: error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    return errors[0]


def _register(data, name, file_name, **extra):
    info = json.loads((data / "dataset_info.json").read_text())
    info[name] = {"file_name": file_name, **extra}
    (data / "dataset_info.json").write_text(json.dumps(info))


CASES = {
    "missing dataset file": (lambda d: _register(d, "ghost", "ghost.json"),
                             {"dataset": "ghost"}, r"ghost\.json"),
    "name not in registry": (lambda d: None, {"dataset": "arithm"}, r"arithm.*dataset_info"),
    "malformed json": (lambda d: ((d / "bad.json").write_text('[{"instruction": "a",\n "output": }]'),
                                  _register(d, "bad", "bad.json")),
                       {"dataset": "bad"}, r"bad\.json.*line 2.*column"),
    "missing columns": (lambda d: ((d / "cols.json").write_text(json.dumps(
                            [{"instruction": "q", "output": "a"}, {"question": "q"}, {"question": "r"}])),
                        _register(d, "cols", "cols.json")),
                        {"dataset": "cols"}, r"cols.*2 .*1"),
    "empty dataset": (lambda d: ((d / "empty.json").write_text("[]"), _register(d, "empty", "empty.json")),
                      {"dataset": "empty"}, r"empty"),
    "unknown template": (lambda d: None, {"template": "llama9"}, r"llama9"),
    "unknown key": (lambda d: None, {"lerning_rate": 1e-4}, r"lerning_rate.*learning_rate"),
    "wrong type": (lambda d: None, {"lora_rank": "eight"}, r"lora_rank"),
    "model path missing": (lambda d: None, {"model_name_or_path": "/nonexistent/model"},
                           r"/nonexistent/model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_output_untouched(case, setup, capsys):
    tmp_path, data, out, config = setup
    prepare, changes, pattern = CASES[case]
    prepare(data)
    before = snapshot(out)
    line = run_bad(capsys, tmp_path, {**config, **changes})
    assert __import__("re").search(pattern, line), line
    assert snapshot(out) == before


def test_bad_override_on_the_command_line(setup, capsys):
    tmp_path, _, out, config = setup
    before = snapshot(out)
    line = run_bad(capsys, tmp_path, config, "learning_rate=fast")
    assert "learning_rate" in line
    assert snapshot(out) == before


def test_subprocess_exit_code_and_debug_traceback(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lora_rnk: 8\noutput_dir: x\n")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("tuneforge: error: unknown config key 'lora_rnk'; "
                                   "did you mean 'lora_rank'?")
    debug = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(cfg), "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_keys_lists_every_key_with_help(capsys):
    assert main(["keys"]) == 0
    text = capsys.readouterr().out
    for key in ("lora_rank", "cutoff_len", "resume_from_checkpoint", "export_dir"):
        assert f"  {key} (default:" in text


def test_every_command_is_on_the_command_line():
    from tuneforge.cli import _parser

    parser = _parser()
    for argv in (["train", "c.yaml"], ["chat"], ["eval"], ["export", "c.yaml"], ["api"], ["webui"], ["keys"], ["env"]):
        assert parser.parse_args(argv).command == argv[0]


def test_output_into_a_closed_pipe_ends_quietly():
    """`tuneforge keys | head -1`: the reader is gone before we write; no traceback, 141."""
    code = ("import sys, time; time.sleep(0.3); from tuneforge.cli import main; "
            "sys.exit(main(['keys']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves at once
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_command_without_any_config_says_what_it_needs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"nothing to {command}: give a YAML config (tuneforge {command} cfg.yaml" in err
    assert "overrides" not in err.splitlines()[-1]


def test_python_warnings_print_as_one_tuneforge_line(monkeypatch, caplog):
    import logging
    import warnings

    from tuneforge import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    cli._quiet_libraries()
    with caplog.at_level(logging.WARNING, logger="tuneforge"), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = cli._warning_as_log_line  # catch_warnings saved the original
        warnings.warn("the head is tied\n  to the embedding", UserWarning)
    assert [r.getMessage() for r in caplog.records] == ["the head is tied to the embedding"]


def test_env_names_the_code_and_interpreter_that_run(capsys):
    """`tuneforge env` (for bug reports) says which tuneforge runs: a checkout or an install."""
    import tuneforge

    assert main(["env"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"tuneforge {tuneforge.__version__} from {Path(tuneforge.__file__).resolve().parent}"
    assert f"({sys.executable})" in out[1]
    assert any(line.startswith("cpu threads: ") for line in out)
