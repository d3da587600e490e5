"""Resuming a run of each stage that has no resume test of its own (pt, kto, kd, cls): 2 steps, then
resume_from_checkpoint: true to 4, ends on the adapter of 4 steps in one go, as SFT's does
(test_loop.py; dpo, rm, ppo, grpo, dynamic_mask and semi prove theirs in their own files). The stage's
own state (kd's teacher, cls's head saved with modules_to_save, kto's mismatched KL rows) must come
back with the checkpoint for this to hold."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.config import load_config
from tuneforge.workflows import train

from test_cls import toy_records, write


def pt_data(folder):
    texts = [f"Line {i}: the river runs past the mill and the miller counts {i} sacks." for i in range(40)]
    return write(folder, "texts", [{"text": t} for t in texts]), {"stage": "pt", "dataset": "texts"}


def kto_data(folder):
    records = [{"instruction": f"Question number {i}?", "output": ("Gladly, here it is." if i % 2 else "Go away."),
                "tag": bool(i % 2)} for i in range(24)]
    folder.mkdir(parents=True)
    (folder / "fb.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"fb": {"file_name": "fb.json",
                                                                 "columns": {"kto_tag": "tag"}}}))
    return folder, {"stage": "kto", "dataset": "fb", "pref_beta": 0.5}


def kd_data(folder, teacher):
    return write_dataset(folder, "arith", arithmetic_records(24)), {
        "stage": "kd", "dataset": "arith", "teacher_model": str(teacher), "kd_alpha": 0.5, "kd_temperature": 2.0}


def cls_data(folder):
    return write(folder, "toy", toy_records(24)), {"stage": "cls", "dataset": "toy", "lora_target": "all"}


@pytest.mark.parametrize("stage", ["pt", "kto", "kd", "cls"])
def test_a_resumed_run_ends_on_the_uninterrupted_runs_adapter(stage, tiny_model_dir, tiny_bert_dir, tmp_path):
    folder = tmp_path / "data"
    data, keys = {"pt": pt_data, "kto": kto_data, "kd": lambda f: kd_data(f, tiny_model_dir),
                  "cls": cls_data}[stage](folder)
    model = tiny_bert_dir if stage == "cls" else tiny_model_dir
    common = {"model_name_or_path": str(model), "dataset_dir": str(data), "cutoff_len": 32, "lora_rank": 4,
              "lora_dropout": 0.1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
              "learning_rate": 5e-3, "lr_scheduler_type": "constant", "max_steps": 4, "save_steps": 2, "logging_steps": 1, "disable_tqdm": True,
              "bf16": False, "report_to": "none", **keys}
    train(load_config(None, {**common, "output_dir": str(tmp_path / "whole")}))
    train(load_config(None, {**common, "output_dir": str(tmp_path / "parts"), "max_steps": 2}))
    train(load_config(None, {**common, "output_dir": str(tmp_path / "parts"), "resume_from_checkpoint": True}))
    whole, parts = (load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    if stage == "cls":  # the head trains in full beside the adapter and is saved with it
        assert any("classifier" in key for key in whole)
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "parts" / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["current_steps"] for e in log if "loss" in e] == [1, 2, 3, 4]
