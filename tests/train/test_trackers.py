"""report_to / run_name: accelerate's trackers (wandb here, offline: no network) get the run's
config and the same train and eval values as trainer_log.jsonl; names and missing packages are
refused in one line before anything loads."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train import trackers
from tuneforge.workflows import train


def test_report_to_names(monkeypatch):
    assert trackers.report_targets("none") == [] and trackers.report_targets(None) == []
    assert trackers.report_targets("wandb, tensorboard") == ["tensorboard", "wandb"]
    real = importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlflow", "swanlab") else real(name, *a))
    assert trackers.report_targets("all") == ["tensorboard", "wandb"]  # the installed ones, as transformers
    with pytest.raises(ConfigError, match=r"^report_to: mlflow needs the mlflow package: pip install mlflow"):
        trackers.report_targets("mlflow")
    with pytest.raises(ConfigError, match=r"^config key 'report_to' must be none, all or a comma list of "
                                          r"tensorboard, wandb, mlflow, swanlab; got 'comet'$"):
        load_config(None, {"report_to": "comet"})


def test_wandb_offline_gets_the_runs_config_and_values(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "tf-test")
    import wandb

    seen: dict = {"logged": []}
    real_init = wandb.init

    def init(*args, **kwargs):  # the real (offline) run, with what it is given recorded
        run = real_init(*args, **kwargs)
        seen["run"], real_log = run, run.log

        def log(values, step=None, **kw):
            seen["logged"].append((step, dict(values)))
            seen["config"] = dict(run.config)
            return real_log(values, step=step, **kw)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    train(load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "arith",
                             "dataset_dir": str(tiny_data_dir), "output_dir": str(out), "cutoff_len": 64,
                             "per_device_train_batch_size": 4, "max_steps": 4, "logging_steps": 2,
                             "val_size": 4, "eval_steps": 2, "report_to": "wandb", "run_name": "tiny-wandb",
                             "disable_tqdm": True, "bf16": False}))
    assert len(list((out / "wandb").glob("offline-run-*/run-*.wandb"))) == 1  # wandb's own offline record
    run = seen["run"]
    assert (run.project, run.name) == ("tf-test", "tiny-wandb")
    assert seen["config"]["learning_rate"] == 1e-4 and "hf_hub_token" not in seen["config"]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_rows = {e["current_steps"]: e["loss"] for e in log if "loss" in e}
    eval_rows = {e["current_steps"]: e["eval_loss"] for e in log if "eval_loss" in e}
    got_train = {step: v["train/loss"] for step, v in seen["logged"] if "train/loss" in v}
    got_eval = {step: v["eval/loss"] for step, v in seen["logged"] if "eval/loss" in v}
    assert got_train.keys() == train_rows.keys() and got_eval.keys() == eval_rows.keys()
    assert all(got_train[k] == pytest.approx(train_rows[k], abs=1e-6) for k in train_rows)
    assert all(got_eval[k] == pytest.approx(eval_rows[k], abs=1e-6) for k in eval_rows)
