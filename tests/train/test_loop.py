"""The training loop on a tiny random Llama: loss falls, accumulation equals one big batch,
outputs and logs are written, fine-tuning types train what they should."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.workflows import train


def tiny_cfg(model_dir, data_dir, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": 12,
        "logging_steps": 2, "save_steps": 100, "lora_rank": 4, "disable_tqdm": True,
        "eval_on_start": True, "bf16": False,  # fp32: the equality tests need it
    }
    values.update(overrides)
    return load_config(None, values)


def test_lora_training_lowers_eval_loss_and_writes_outputs(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    results = train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, val_size=8, plot_loss=True,
                             report_to="tensorboard", eval_steps=6, max_steps=16))
    assert results["eval_loss"] < results["eval_loss_before"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_log.jsonl",
                 "training_args.yaml", "train_results.json", "training_loss.png",
                 "tokenizer.json", "checkpoint-16/trainer_state.json"):
        assert (out / name).exists(), name
    assert list((out / "runs").glob("events.out.tfevents.*"))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_entries = [e for e in log if "loss" in e]
    assert [e["current_steps"] for e in train_entries] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert train_entries[-1]["loss"] < train_entries[0]["loss"]
    assert {e["current_steps"] for e in log if "eval_loss" in e} == {0, 6, 12, 16}
    assert all(e["tokens_per_second"] > 0 for e in train_entries)
    # the eval before the first step has no rate to project a remaining time from
    assert [("remaining_time" in e) for e in log if e["current_steps"] == 0] == [False]
    assert all("remaining_time" in e for e in log if e["current_steps"] > 0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4


def _adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def test_accumulation_equals_one_big_batch(tiny_model_dir, tiny_data_dir, tmp_path):
    """Loss is normalised by the label tokens of the whole step, so 1 x 8 equals 8 x 1 even
    though the micro-batches hold different numbers of label tokens."""
    # adam_epsilon=1 turns AdamW's first step into plain SGD (update = g / (|g| + 1) ~ g), so
    # the weights show the gradient itself rather than Adam's sign-like normalisation of it
    common = dict(max_steps=1, learning_rate=1.0, adam_epsilon=1.0, val_size=0,
                  eval_on_start=False, max_grad_norm=0.0, lr_scheduler_type="constant")
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "big",
                   per_device_train_batch_size=8, gradient_accumulation_steps=1, **common))
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "acc",
                   per_device_train_batch_size=1, gradient_accumulation_steps=8, **common))
    big, acc = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    assert big.keys() == acc.keys()
    assert any(big[key].abs().max() > 1e-4 for key in big if "lora_B" in key)
    for key in big:
        torch.testing.assert_close(acc[key], big[key], atol=1e-6, rtol=1e-4)


def test_output_dir_rules(tiny_model_dir, tiny_data_dir, tmp_path):
    from tuneforge.errors import CheckpointError

    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty and has no checkpoint"):
        train(tiny_cfg(tiny_model_dir, tiny_data_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    run = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, run, max_steps=4, save_steps=2))
    assert (run / "checkpoint-2").is_dir() and (run / "checkpoint-4").is_dir()
    # with checkpoints present a new run resumes (here: already finished, so nothing to do)
    results = train(tiny_cfg(tiny_model_dir, tiny_data_dir, run, max_steps=4, save_steps=2))
    assert results["global_step"] == 4
    with pytest.raises(CheckpointError, match="no checkpoint-N folder"):
        train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "fresh",
                       resume_from_checkpoint=True))


def test_resume_from_a_checkpoint_continues_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    common = dict(max_steps=6, save_steps=3, lora_dropout=0.1, val_size=0)
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "full", **common))
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "part", **common))
    part = tmp_path / "part"
    # pretend the run died after step 3
    import shutil

    shutil.rmtree(part / "checkpoint-6")
    (part / "adapter_model.safetensors").unlink()
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, part,
                   resume_from_checkpoint=str(part / "checkpoint-3"), **common))
    full, resumed = _adapter(tmp_path / "full"), _adapter(part)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_freeze_trains_only_the_last_layers(tiny_model_dir, tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "freeze"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, finetuning_type="freeze",
                   freeze_trainable_layers=1, max_steps=3, learning_rate=1e-3))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def test_full_finetuning_changes_every_layer(tiny_model_dir, tiny_data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, finetuning_type="full", max_steps=2,
                   learning_rate=1e-3))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_bf16_autocast_where_the_cpu_has_it(tiny_model_dir, tiny_data_dir, tmp_path):
    from tuneforge.models import bf16_is_fast

    if not bf16_is_fast("cpu"):
        pytest.skip("this CPU has no native bf16; the fp32 path is what runs here")
    results = train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "bf16", bf16=True,
                             val_size=8, max_steps=12))
    assert results["eval_loss"] < results["eval_loss_before"]


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, tiny_data_dir, tmp_path):
    common = dict(max_steps=3, val_size=0, eval_on_start=False)
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "plain", **common))
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "ckpt", gradient_checkpointing=True,
                   **common))
    plain, ckpt = _adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_is_switched_on(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.workflows import _enable_activation_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    _enable_activation_checkpointing(model)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_fp16_where_it_cannot_run_says_so(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    """C29: fp16 mixed precision needs a CUDA GPU; elsewhere one warning line says what the run
    trains in instead (as for bf16)."""
    import logging

    from tuneforge.models import bf16_is_fast

    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "fp16", fp16=True, bf16=None,
                       max_steps=1, eval_on_start=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if torch.cuda.is_available():  # fp16 runs: nothing to say
        assert not [w for w in warnings if "fp16" in w]
    else:
        instead = "bf16" if bf16_is_fast("cpu") else "fp32"
        assert warnings == ["fp16 requested but fp16 training needs a CUDA GPU and this is a "
                            f"cpu; training in {instead}"]
