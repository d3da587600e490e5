"""`finetuning_type: lora_dynamic` from a YAML config: the loss falls, the eval loss by rank is printed
and written to train_results.json (its entry at the saved rank is the run's eval loss), the run saves
the plain peft LoRA of the saved rank, `tuneforge export` merges it into a model that answers as base +
adapter, and a run resumed from a checkpoint trains the same ranks to the same adapter."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from adapter_testkit import assert_export_equals_chat

from tuneforge.config import load_config
from tuneforge.workflows import train


def _cfg(model_dir, data_dir, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "finetuning_type": "lora_dynamic", "lora_target": "all",
        "dynamic_rank": {"min": 2, "max": 6, "schedule": "linear", "save": 4}, "cutoff_len": 64,
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 8, "logging_steps": 2,
        "save_steps": 100, "disable_tqdm": True, "bf16": False, "eval_on_start": False,
    }
    values.update(overrides)
    return load_config(None, values)


def test_lora_dynamic_trains_from_yaml_reports_loss_by_rank_and_exports(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    results = train(_cfg(tiny_model_dir, tiny_data_dir, out, val_size=0.25))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    by_rank = json.loads((out / "train_results.json").read_text())["eval_loss_by_rank"]
    assert list(by_rank) == ["2", "4", "6"] and results["eval_loss_by_rank"] == by_rank
    assert abs(by_rank["4"] - results["eval_loss"]) < 1e-6  # the run's eval is at the saved rank
    assert len(set(by_rank.values())) == 3  # each rank is its own adapter
    printed = capsys.readouterr().out
    assert "eval loss by rank (Dynamic LoRA 'default', saved at rank 4):" in printed
    assert f"     6  {by_rank['6']:.4f}" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 12)  # alpha: 2 x max

    assert_export_equals_chat(tiny_model_dir, out, tmp_path / "merged")


def test_a_resumed_run_trains_the_same_ranks_to_the_same_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    common = dict(max_steps=4, save_steps=2, dynamic_rank={"min": 1, "max": 6})
    train(_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "full", **common))
    part = tmp_path / "part"
    train(_cfg(tiny_model_dir, tiny_data_dir, part, **common))
    shutil.rmtree(part / "checkpoint-4")  # pretend the run died after step 2
    assert json.loads((part / "checkpoint-2" / "adapter_config.json").read_text())["r"] == 2  # r(2) of 4 steps
    train(_cfg(tiny_model_dir, tiny_data_dir, part, resume_from_checkpoint=str(part / "checkpoint-2"), **common))
    full, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", part))
    assert all(t.shape[0] == 6 or t.shape[1] == 6 for t in full.values())
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
