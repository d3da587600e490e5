"""The arithmetic of benchmarks/train_throughput.py: FLOP formula, token counts, timing window."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # train_throughput imports throughput_arms by name
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = _load("train_throughput")
arms = _load("throughput_arms")


def test_model_shape_and_flops_match_a_hand_count():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
    shape = bench.model_shape(config, rank=8)
    # per layer q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64; head 64x100
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    assert shape["linear_params"] == 2 * per_layer + 6400
    # r * (in + out) summed over the adapted layers (not the head)
    assert shape["lora_params"] == 8 * 2 * (128 + 96 + 96 + 128 + 3 * 192)
    assert shape["layers"] == 2 and shape["attn_dim"] == 64
    # one sequence of 3 tokens: (4N + 6 r S) * 3 + 12 * L * d * (1 + 2 + 3)
    expected = (4 * 80128 + 6 * 16384) * 3 + 12 * 2 * 64 * 6
    assert bench.step_flops([3], shape) == expected
    assert bench.step_flops([3, 3], shape) == 2 * expected


def test_batch_counts_padded_and_packed():
    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    assert arms.batch_counts(padded) == (4, 8, [3, 1])
    packed = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert arms.batch_counts(packed) == (5, 5, [3, 2])


def test_recorder_groups_micro_batches_and_summarise_skips_the_warmup_step():
    rec = arms.Recorder(grad_accum=2)
    rec.started = 0.0
    for real in (3, 1, 2, 2, 4, 4):
        rec.batch({"input_ids": torch.zeros(1, 4, dtype=torch.long),
                   "attention_mask": (torch.arange(4) < real).long()[None]})
    for began, ended in ((0.0, 10.0), (10.0, 12.0), (12.0, 14.0)):
        rec.step(began, ended)
    result = rec.result([3.0, 2.0, 1.0])
    assert [s["real"] for s in result["steps"]] == [4, 4, 8]
    assert [s["positions"] for s in result["steps"]] == [8, 8, 8]
    shape = {"linear_params": 1, "lora_params": 0, "layers": 0, "attn_dim": 0}
    bench.summarise(result, shape, rate=1.0)
    assert result["seconds"] == 4.0 and result["timed_steps"] == 2  # steps 2 and 3
    assert result["real_tps"] == 12 / 4 and result["all_tps"] == 16 / 4
    assert result["padding"] == 1 - 16 / 24
    assert result["last_loss"] == 1.0 and result["mean_loss"] == 2.0
    assert result["mfu"] == 4 * 12 / 4  # 4 FLOPs per token of a 1-weight model, rate 1
