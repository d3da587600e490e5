"""Stop on a run started as the page starts it: a checkpoint is left, and the CLI run of the same
YAML resumes from it and finishes."""

from __future__ import annotations

import time

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.cli import main
from tuneforge.train.reporting import read_log
from tuneforge.webui.runner import Runner


def test_stop_leaves_a_checkpoint_the_cli_resumes(tmp_path, tiny_model_dir, capsys):
    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(16))
    out = tmp_path / "out"
    values = {"model_name_or_path": str(tiny_model_dir), "dataset_dir": str(data), "dataset": "arith",
              "cutoff_len": 64, "max_steps": 20, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
              "logging_steps": 1, "save_steps": 1000, "lora_rank": 4, "output_dir": str(out), "eval_on_start": False}
    runner = Runner()
    run = runner.start(values)
    deadline = time.time() + 120
    while not read_log(out) and run.state == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert runner.stop()
    run.process.wait(60)
    assert run.state == "stopped", run.log_path.read_text()
    stopped_at = read_log(out)[-1]["current_steps"]
    assert stopped_at < 20 and (out / f"checkpoint-{stopped_at}").is_dir()
    assert "to resume, run the same command again" in run.log_path.read_text()
    assert main(["train", str(run.yaml_path)]) == 0  # the CLI, in this process (no second start-up)
    printed = capsys.readouterr()
    assert f"resumed from {out / f'checkpoint-{stopped_at}'}" in printed.out + printed.err
    assert read_log(out)[-1]["current_steps"] == 20
    assert (out / "adapter_model.safetensors").is_file()
