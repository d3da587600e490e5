"""benchmarks/whole_job.py's measuring and judging: a process tree's peak RSS and CPU seconds,
the YAML it writes, and the goal lines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("whole_job", BENCH / "whole_job.py")
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)
MB = 1 << 20


def test_run_process_counts_the_child_trees_memory_and_cpu(tmp_path):
    # a parent holding 50 MB starts a child holding 150 MB: the tree's peak is both together
    child = "import time; b = bytearray(150 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = (f"import subprocess, sys, time; a = bytearray(50 << 20); a[::4096] = b'y' * len(a[::4096]); "
              f"subprocess.run([sys.executable, '-c', {child!r}]); sum(range(3_000_000))")
    r = job.run_process([sys.executable, "-c", parent], {}, tmp_path / "log")
    assert r["code"] == 0 and r["ended"] > r["launched"]
    assert r["peak_rss"] >= 200 * MB  # more than either process alone
    assert r["cpu_s"] > 0


def test_yaml_is_read_back_as_the_job_keys(tmp_path):
    from tuneforge.config import load_config

    opts = SimpleNamespace(dataset="alpaca_en_demo", dataset_dir=str(tmp_path), cutoff=512, batch=4, grad_accum=2,
                           steps=12, overrides={"bf16": True})
    keys = job.job_keys(opts, str(tmp_path / "out"))
    cfg = load_config(str(job.write_yaml(tmp_path / "job.yaml", keys)))
    assert (cfg.finetune.lora_rank, cfg.finetune.lora_target, cfg.data.cutoff_len) == (8, "all", 512)
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps) == (4, 2)
    assert (cfg.train.max_steps, cfg.train.learning_rate, cfg.train.bf16) == (12, 1e-4, True)


def test_goal_lines_judge_tuneforge_against_llamafactory_else_the_peer():
    def arm(name, wall, rss, loss):
        return {"arm": name, "wall_s": wall, "peak_rss": rss, "last_loss": loss}

    peer, tf = arm("peer", 400.0, 4000 * MB, 1.50), arm("tuneforge", 100.0, 2000 * MB, 1.52)
    lines = job.goal_lines([peer, tf])
    assert lines == ["goal wall >= 4x peer: 4.00x -> met", "goal peak RSS <= 0.6x peer: 0.50x -> met",
                     "goal same last loss within 2%: 1.33% apart -> met"]
    lf = arm("llamafactory", 200.0, 3000 * MB, 1.40)
    lines = job.goal_lines([peer, lf, tf])
    assert lines[0].endswith("llamafactory: 2.00x -> not met") and lines[1].endswith("0.67x -> not met")
    assert lines[2].endswith("8.57% apart -> not met")
    assert job.goal_lines([peer, {"arm": "tuneforge", "error": "exit 2"}]) == [
        "goals: not judged (an arm failed or was not run)"]
    assert "failed: exit 2" in job.table([{"arm": "tuneforge", "error": "exit 2"}])
    row = {"arm": "tuneforge", "wall_s": 100.0, "startup_s": 20.0, "train_s": 75.0, "save_s": 4.0, "exit_s": 1.0,
           "peak_rss": 2048 * MB, "cpu_s": 190.0, "last_loss": 1.23456}
    assert job.table([row]).splitlines()[-1] == "| tuneforge | 100.0 | 20.0 | 75.0 | 4.0 | 1.0 | 2,048 | 190.0 | 1.2346 |"


def test_matmul_work_counts_passes_positions_and_head_rows(tmp_path):
    # hidden 4, 2 heads of 2 (q, o: 4x4 each), 1 key/value head (k, v: 4x2 each), MLP 8 (3 of 4x8), 3 layers
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10}))
    per_position = 3 * (16 + 16 + 8 + 8 + 3 * 32)  # 432 multiply-adds through the decoder
    head = 4 * 10
    work = {"positions": 5, "head": 2, "body_passes": 3, "real": 4}
    assert job.matmul_work(str(tmp_path), work) == 5 * per_position * 3 + 2 * head * 2
    peer = {"arm": "peer", "train_s": 30.0, "work": work}
    tf = {"arm": "tuneforge", "train_s": 10.0, "work": {"positions": 4, "head": 1, "body_passes": 2, "real": 4}}
    ratio = job.matmul_work(str(tmp_path), work) / job.matmul_work(str(tmp_path), tf["work"])
    line = job.work_line([peer, tf], str(tmp_path))
    assert f": {ratio:.2f}x, the training time's ratio at equal matmul speed; measured 3.00x" in line
    assert job.work_line([peer], str(tmp_path)) is None
