"""The real default model (SmolLM2-135M-Instruct) end to end, on LLaMA-Factory's demo data."""

from __future__ import annotations

import json

import pytest

from tuneforge.cli import main

pytestmark = pytest.mark.integration


def test_lora_on_alpaca_en_demo_lowers_held_out_loss(tmp_path, shared_data_dir, default_model_path,
                                                    capsys):
    out = tmp_path / "alpaca-lora"
    code = main(["train", "dataset=alpaca_en_demo", f"dataset_dir={shared_data_dir}",
                 f"output_dir={out}", "max_samples=96", "val_size=16", "cutoff_len=192",
                 "per_device_train_batch_size=4", "gradient_accumulation_steps=2",
                 "learning_rate=5e-4", "max_steps=8", "logging_steps=2", "save_steps=4",
                 "lr_scheduler_type=cosine", "warmup_ratio=0.1", "disable_tqdm=true"])
    assert code == 0
    results = json.loads((out / "train_results.json").read_text())
    printed = capsys.readouterr().out
    assert "eval_loss before training" in printed and "eval_loss after training" in printed
    assert results["eval_loss"] < results["eval_loss_before"], results
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()

    # the adapter answers through the CLI, loaded onto the default model
    assert main(["chat", "--adapter", str(out), "--prompt", "Name three primary colors.",
                 "do_sample=false", "max_new_tokens=24"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_qlora_4bit_on_the_default_model_lowers_held_out_loss(tmp_path, shared_data_dir):
    """QLoRA from the CLI: NF4 base (double quantization), LoRA on all linear layers."""
    from safetensors.torch import load_file

    out = tmp_path / "alpaca-qlora"
    code = main(["train", "dataset=alpaca_en_demo", f"dataset_dir={shared_data_dir}",
                 f"output_dir={out}", "max_samples=64", "val_size=16", "cutoff_len=128",
                 "quantization_bit=4", "quantization_type=nf4", "double_quantization=true",
                 "lora_target=all", "per_device_train_batch_size=4", "gradient_accumulation_steps=2",
                 "learning_rate=5e-4", "max_steps=6", "logging_steps=2", "save_steps=100",
                 "disable_tqdm=true"])
    assert code == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["eval_loss"] < results["eval_loss_before"], results
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 30 * 7 * 2 and all("lora_" in k for k in tensors)
