"""FSDP2 (accelerate's FullyShardedDataParallelPlugin, torch's fully_shard) on CPUs: two gloo
processes with `fsdp: full_shard auto_wrap` train as one process with the same global batch,
step by step (the logged losses) and to the end (the weights, within 1e-5 in fp32), for LoRA and
for full fine-tuning. The LoRA run is started as users start it on one machine:
`FORCE_TORCHRUN=1 NPROC_PER_NODE=2 tuneforge train ...` (LLaMA-Factory's launcher variables); the
full one by torchrun by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.workflows import train

STEPS = {"max_steps": 6, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "bf16": False,
         "disable_tqdm": True, "cutoff_len": 64, "lora_rank": 4, "gradient_accumulation_steps": 2,
         "logging_steps": 1, "save_strategy": "no"}


def _argv(values: dict) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def _losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "trainer_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The 2-process FSDP runs (started together: they share the cores' waiting; the full one
    killed and resumed) and the single-process runs they must equal."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_dataset(root / "data", "arith", arithmetic_records(40))
    common = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(data), **STEPS}
    sharded = {"per_device_train_batch_size": 4, "fsdp": "full_shard auto_wrap"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lora = subprocess.Popen([sys.executable, "-m", "tuneforge", "train",
                             *_argv({**common, **sharded, "output_dir": root / "lora2"})],
                            env={**env, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    full_args = {**common, **sharded, "finetuning_type": "full", "save_strategy": "steps", "save_steps": 3}
    # the full run is killed (SIGKILL of its second process) once checkpoint-3 is written, and
    # started again: it must still end as the one process does
    broken = root / "full2"
    victim = subprocess.Popen(_torchrun({**full_args, "output_dir": broken}), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (broken / "checkpoint-3").is_dir():
        assert victim.poll() is None, "the run to kill ended before its checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)
    rank1 = [p for p in psutil.Process(victim.pid).children() if p.environ().get("LOCAL_RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].kill()
    assert victim.wait(timeout=600) != 0
    assert not (broken / "model.safetensors").exists(), "killed too late to prove anything"
    for kind in ("lora", "full"):  # the oracles, in this process meanwhile
        train(_config({**common, "per_device_train_batch_size": 8, "finetuning_type": kind,
                       "output_dir": str(root / f"{kind}1")}))
    output, _ = lora.communicate(timeout=600)
    assert lora.returncode == 0, output[-3000:]
    # the same command again finds checkpoint-3 and resumes from it
    resumed = subprocess.run(_torchrun({**full_args, "output_dir": broken}), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, output, resumed.stdout


def _torchrun(values: dict) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tuneforge", "train",
            *_argv(values)]


def _config(values: dict):
    from tuneforge.config import load_config

    return load_config(None, values)


@pytest.mark.parametrize("kind, weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors")])
def test_fsdp2_two_processes_equal_one_with_the_same_global_batch(runs, kind, weights):
    root, _, _ = runs
    two, one = root / f"{kind}2", root / f"{kind}1"
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)  # each of the 6 steps
    a, b = load_file(str(two / weights)), load_file(str(one / weights))
    assert sorted(a) == sorted(b)  # the ordinary peft / HF files, gathered whole
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst <= 1e-5, worst
    assert len(_losses(two)) == 6 and _losses(two)[-1] < _losses(two)[0]  # it trained


def test_force_torchrun_relaunches_under_torchrun(runs):
    """`tuneforge train` with FORCE_TORCHRUN=1 started torchrun with NPROC_PER_NODE processes (the
    LoRA run above equals the 8-example batch only with both of its 4-example halves)."""
    _, output, _ = runs
    assert "starting 2 processes per node on 1 node(s) under torchrun" in output


def test_fsdp2_killed_run_resumes_from_its_checkpoint(runs):
    """The full run above was killed after checkpoint-3 and resumed from it (its end equals one
    process's: test_fsdp2_two_processes_equal_one_with_the_same_global_batch[full])."""
    root, _, resumed_output = runs
    assert f"resumed from {root / 'full2' / 'checkpoint-3'} at step 3" in resumed_output
    saved = torch.load(root / "full2" / "checkpoint-3" / "rng_state.pt", weights_only=True)
    assert len(saved["ranks"]) == 2  # each process's RNG states
    optimizer = torch.load(root / "full2" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    weights = load_file(str(root / "full2" / "model.safetensors"))
    moments = {name: tuple(entry["exp_avg"].shape) for name, entry in optimizer["state"].items()}
    assert len(moments) == len(weights) - ("lm_head.weight" in weights)  # tied: one entry
    assert all(moments[name] == tuple(t.shape) for name, t in weights.items() if name in moments)  # whole
