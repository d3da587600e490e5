"""Configs written the way LLaMA-Factory's examples are run unchanged through `train`, `export` and
`chat`: a hub id served from a local Hugging Face cache (offline), LLaMA-Factory's template names,
its keys (report_to, preprocessing_num_workers, dataloader_num_workers, ddp_timeout, ...), relative
`saves/...` folders and `data/` in the working folder. Only `max_steps` is added on the command line.
(benchmarks/lf_examples.py runs LLaMA-Factory's own examples/ folder the same way.)"""

from __future__ import annotations

import json

import pytest

from tests.test_hub import make_cache
from tuneforge.cli import main

HUB_ID = "Qwen/Qwen3-4B-Instruct-2507"
COMMON = f"""model_name_or_path: {HUB_ID}
trust_remote_code: true
"""
TRAIN = COMMON + """
### method
stage: {stage}
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
{extra}
### dataset
dataset: {dataset}
template: {template}
cutoff_len: 128
max_samples: 8
preprocessing_num_workers: 16
dataloader_num_workers: 0

### output
output_dir: saves/qwen3-4b/lora/{stage}
logging_steps: 1
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
"""
MERGE = COMMON + """adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink

### export
export_dir: saves/qwen3_sft_merged
export_size: 5
export_device: cpu  # choices: [cpu, auto]
export_legacy_format: false
"""
INFER = COMMON + """adapter_name_or_path: saves/qwen3-4b/lora/sft
template: qwen3_nothink
infer_backend: huggingface  # choices: [huggingface, vllm, sglang, ktransformers]
"""


@pytest.fixture
def lf_folder(tmp_path, monkeypatch, tiny_model_dir, shared_data_dir):
    """A working folder as a LLaMA-Factory user has it: data/ and an HF cache holding the hub id."""
    make_cache(tmp_path / "hf" / "hub", HUB_ID, tiny_model_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "data").symlink_to(shared_data_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(folder, name, text):
    (folder / name).write_text(text)
    return name


def test_llama_factory_style_configs_train_merge_and_chat(lf_folder, capsys):
    sft = _write(lf_folder, "qwen3_lora_sft.yaml",
                 TRAIN.format(stage="sft", extra="", dataset="identity,alpaca_en_demo", template="qwen3_nothink"))
    assert main(["train", sft, "max_steps=2"]) == 0, capsys.readouterr().err
    adapter = lf_folder / "saves/qwen3-4b/lora/sft"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert (adapter / "training_loss.png").exists()

    assert main(["export", _write(lf_folder, "qwen3_lora_sft_merge.yaml", MERGE)]) == 0, capsys.readouterr().err
    merged = lf_folder / "saves/qwen3_sft_merged"
    assert (merged / "config.json").exists() and (merged / "Modelfile").exists()

    capsys.readouterr()
    assert main(["chat", _write(lf_folder, "qwen3_lora_sft_infer.yaml", INFER), "--prompt", "Who are you?",
                 "max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("stage, extra, dataset, template", [
    ("dpo", "pref_beta: 0.1\npref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]\n", "dpo_en_demo",
     "qwen3_nothink"),
    ("sft", "", "glaive_toolcall_en_demo", "qwen"),  # tool calls in Qwen's own tool format
    ("kto", "pref_beta: 0.1\n", "kto_en_demo", "llama3"),
])
def test_llama_factory_style_stages_and_data_train(lf_folder, capsys, stage, extra, dataset, template):
    path = _write(lf_folder, f"{stage}.yaml", TRAIN.format(stage=stage, extra=extra, dataset=dataset,
                                                            template=template))
    assert main(["train", path, "max_steps=1"]) == 0, capsys.readouterr().err
    assert (lf_folder / f"saves/qwen3-4b/lora/{stage}/adapter_model.safetensors").exists()
