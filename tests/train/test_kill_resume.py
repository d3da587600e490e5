"""kill -9 in the middle of a run, then resume: the final adapter equals an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml
from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset

STEPS, SAVE_EVERY = 30, 5


def config(tmp_path, model_dir, data_dir, out):
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "max_steps": STEPS,
        "save_steps": SAVE_EVERY, "logging_steps": 1, "lora_rank": 4, "lora_dropout": 0.1,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": False, "disable_tqdm": True,
    }))
    return path


def tuneforge(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tuneforge", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(200))
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    # one run at a time: two processes spinning on 2 cores slow each other down many times over
    reference = tuneforge("train", config(tmp_path, tiny_model_dir, data, whole))
    assert reference.wait() == 0, reference.stderr.read()

    victim = tuneforge("train", config(tmp_path, tiny_model_dir, data, broken))
    deadline = time.time() + 300
    while not (broken / f"checkpoint-{2 * SAVE_EVERY}").is_dir():
        assert victim.poll() is None, f"run ended before it could be killed: {victim.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (broken / "adapter_model.safetensors").exists(), "killed too late to prove anything"
    killed_at = max(int(p.name.split("-")[1]) for p in broken.glob("checkpoint-*"))
    assert killed_at < STEPS

    # a plain re-run finds the checkpoints and resumes from the newest complete one
    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train",
                              config(tmp_path, tiny_model_dir, data, broken)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"[tuneforge] resumed from {broken / f'checkpoint-{killed_at}'} at step {killed_at}" in resumed.stdout

    want = load_file(str(whole / "adapter_model.safetensors"))
    got = load_file(str(broken / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, worst
    assert not any(p.name.startswith(".tmp-checkpoint") for p in broken.iterdir())
