"""Gradient checkpointing chosen by memory when the config leaves it empty (train/memory_plan.py):
the activation estimate, the free-memory reading, and a run that turns it on (or is told not to)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig

from tuneforge import workflows
from tuneforge.config import load_config
from tuneforge.train import memory_plan


def test_activation_bytes_counts_what_a_layer_keeps():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    # per token and layer: 6 d + 2 kv + 4 i = 384 + 2 * 32 + 512 values
    assert memory_plan.activation_bytes(config, tokens=10) == 2 * 10 * 960 * 4
    assert memory_plan.activation_bytes(config, tokens=10, element_bytes=2) == 2 * 10 * 960 * 2
    assert memory_plan.activation_bytes(object(), tokens=10) == 0  # no sizes known: no estimate
    # a lean gated MLP (train/lean_mlp.py) keeps 2 i instead of 4 i
    assert memory_plan.activation_bytes(config, tokens=10, lean_mlp=True) == 2 * 10 * (960 - 256) * 4
    # lean norms (train/lean_layers.py) keep 2 d fewer
    assert memory_plan.activation_bytes(config, tokens=10, lean_norms=True) == 2 * 10 * (960 - 128) * 4


def test_available_bytes_reads_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1000 kB\n")
    assert memory_plan.available_bytes("cpu", meminfo) == 1000 * 1024
    assert memory_plan.available_bytes("cpu", tmp_path / "missing") is None


def test_choose_checkpointing_only_when_activations_crowd_the_memory():
    model = type("M", (), {"config": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2)})()
    need = memory_plan.activation_bytes(model.config, 100)
    assert memory_plan.choose_checkpointing(model, 100, 4, available=4 * need) is None
    assert memory_plan.choose_checkpointing(model, 100, 4, available=None) is None
    line = memory_plan.choose_checkpointing(model, 100, 4, available=need)
    assert line.startswith("gradient checkpointing: on") and "gradient_checkpointing: false" in line


@pytest.mark.parametrize("keys, expected", [({}, True), ({"gradient_checkpointing": False}, False)])
def test_a_run_with_little_memory_checkpoints_unless_the_config_says(keys, expected, tiny_model_dir, tiny_data_dir,
                                                                     tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device="cpu": 1 << 10)  # 1 kB free
    enabled = []
    real = workflows._enable_activation_checkpointing
    monkeypatch.setattr(workflows, "_enable_activation_checkpointing",
                        lambda model, kwargs=None: (enabled.append(kwargs), real(model, kwargs))[1])
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "arith",
                             "dataset_dir": str(tiny_data_dir), "output_dir": str(tmp_path / "out"),
                             "cutoff_len": 32, "max_steps": 1, "per_device_train_batch_size": 2, "bf16": False,
                             "disable_tqdm": True, **keys})
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        workflows.train(cfg)
    assert enabled == ([{"use_reentrant": True}] if expected else [])
    assert any(r.getMessage().startswith("gradient checkpointing: on") for r in caplog.records) == expected
    # the lean MLPs only where the activations are kept (train/lean_mlp.py)
    assert any(r.getMessage().startswith("activations: 2 gated MLPs") for r in caplog.records) == (not expected)


def test_pairwise_examples_count_as_two_sequences(tiny_model_dir, tmp_path, monkeypatch):
    """A dpo micro-batch of B pairs holds up to 2 B sequences of cutoff_len: the estimate sees that."""
    from tests.train.test_dpo import dpo_values, toy_pairs

    seen = []
    real = memory_plan.choose_checkpointing
    monkeypatch.setattr(memory_plan, "choose_checkpointing",
                        lambda model, tokens, *a, **kw: (seen.append(tokens), real(model, tokens, *a, **kw))[1])
    workflows.train(dpo_values(tiny_model_dir, toy_pairs(tmp_path / "data"), tmp_path / "out", max_steps=1,
                               save_steps=100, val_size=0, per_device_train_batch_size=2))
    assert seen == [2 * 2 * 64]  # 2 sequences x 2 pairs x cutoff_len 64


def test_forward_tokens_counts_one_part_where_the_stage_splits():
    from tuneforge.train.stages import get_stage

    model = torch.nn.Linear(2, 2)  # no adapters
    assert memory_plan.forward_tokens(get_stage("rm"), model, 4, 2, 64) == (4 * 2 * 64, None)  # runs whole
    for stage in ("sft", "pt"):  # parts of up to cutoff_len
        tokens, line = memory_plan.forward_tokens(get_stage(stage), model, 4, 1, 64)
        assert tokens == 64 and line.startswith("micro-batches: each runs as parts of whole examples of up to 64")
    assert memory_plan.forward_tokens(get_stage("sft"), model, 1, 1, 64) == (64, None)
    # dpo / kto: parts of up to 512 tokens (train/parts.py PART_TOKENS) or one longer pair / example
    assert memory_plan.forward_tokens(get_stage("dpo"), model, 4, 2, 512)[0] == 2 * 512  # one pair
    assert memory_plan.forward_tokens(get_stage("dpo"), model, 8, 2, 64)[0] == 512
    assert memory_plan.forward_tokens(get_stage("dpo"), model, 2, 2, 64) == (2 * 2 * 64, None)  # fits one part
    assert memory_plan.forward_tokens(get_stage("kto"), model, 4, 1, 1024)[0] == 1024


@pytest.mark.parametrize("method, tokens", [("lora", 32), ("lora_moe", 2 * 32)])
def test_the_plan_sees_one_part_and_logs_it(method, tokens, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch,
                                            caplog):
    """sft runs a micro-batch of 2 as parts of at most one example (cutoff_len 32 tokens): the
    checkpointing choice sees 32 tokens; lora_moe's micro-batches run whole, so it sees 2 x 32."""
    seen = []
    real = memory_plan.choose_checkpointing
    monkeypatch.setattr(memory_plan, "choose_checkpointing",
                        lambda model, tokens, *a, **kw: (seen.append(tokens), real(model, tokens, *a, **kw))[1])
    cfg = load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "arith",
                             "dataset_dir": str(tiny_data_dir), "output_dir": str(tmp_path / "out"),
                             "finetuning_type": method, "cutoff_len": 32, "max_steps": 1,
                             "per_device_train_batch_size": 2, "bf16": False, "disable_tqdm": True})
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        workflows.train(cfg)
    assert seen == [tokens]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("micro-batches:")]
    assert len(lines) == 1
    assert lines[0].startswith("micro-batches: each runs as parts" if method == "lora" else
                               "micro-batches: run whole (an adapter method adds a term of each whole forward")
