"""`finetuning_type: lora_ensemble` from a YAML config: the members and their learned weights train,
the run saves the plain peft LoRA they sum to (rank = the members' total), and `tuneforge export`
merges it into a model that answers as base + adapter."""

from __future__ import annotations

import json


from adapter_testkit import assert_export_equals_chat

from tuneforge.config import load_config
from tuneforge.workflows import train


def test_lora_ensemble_trains_from_yaml_and_exports_merged(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "ensemble.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: lora_ensemble\nensemble: [{{r: 2}}, {{r: 6, lora_alpha: 6}}]\n"
        "ensemble_weights: learn\nlora_target: all\ncutoff_len: 64\nper_device_train_batch_size: 4\n"
        "learning_rate: 2.0e-2\nmax_steps: 10\nlogging_steps: 2\nsave_steps: 100\ndisable_tqdm: true\nbf16: false\n"
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 8)

    assert_export_equals_chat(tiny_model_dir, out, tmp_path / "merged")
