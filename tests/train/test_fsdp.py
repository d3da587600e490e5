"""FSDP2 (accelerate's FullyShardedDataParallelPlugin, torch's fully_shard) on CPUs: two gloo
processes with `fsdp: full_shard auto_wrap` train as one process with the same global batch,
step by step (the logged losses) and to the end (the weights, within 1e-5 in fp32), for LoRA and
for full fine-tuning. The LoRA run is QLoRA (quantization_bit: 4, fsdp_qlora's setup) and also
trains the norms whole (additional_target: norm, peft's modules_to_save: inside the sharded decoder
layers and at the root). It is started as users start it on one machine: `FORCE_TORCHRUN=1
NPROC_PER_NODE=2 tuneforge train ...` (LLaMA-Factory's launcher variables); the full one by
torchrun by hand."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.distributed.launch import free_port
from tuneforge.workflows import train

STEPS = {"max_steps": 6, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "bf16": False,
         "disable_tqdm": True, "cutoff_len": 64, "lora_rank": 4, "gradient_accumulation_steps": 2,
         "logging_steps": 1, "save_strategy": "no"}

# The LoRA run is QLoRA (tuneforge's 4-bit codes are buffers: every process holds them whole) and
# trains every RMSNorm whole (modules_to_save), computed in fp32: with compute_dtype auto (bf16 on
# this CPU) any other summation order, even one process's fused cross-entropy against FSDP2's plain
# one (its head is an FSDPLinear), is rounded to bf16 in the 4-bit matmuls (~2e-4 relative)
LORA = {"additional_target": "norm", "quantization_bit": 4, "compute_dtype": "float32"}

# Full fine-tuning at lr 1e-4: Adam divides each gradient by its own scale, so an entry whose summands
# cancel takes its sign from fp32 rounding, and any other summation order moves it by up to the learning
# rate. One process alone, its micro-batches whole or in parts (train/parts.py), ends 2.8e-5 apart at
# lr 1e-3 (measured); the two processes' all-reduce is such another order. At 1e-4 that order noise is
# ~3e-6 while a real fault (a gradient not reduced, a lost optimizer shard) still moves weights by ~lr
FULL = {"finetuning_type": "full", "learning_rate": 1e-4}

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
                             *_argv({**common, **sharded, **LORA, "save_strategy": "steps", "save_steps": 3,
                                     "output_dir": root / "lora2"})],
                            env={**env, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    full_args = {**common, **sharded, **FULL, "save_strategy": "steps", "save_steps": 3}
    # the full run is killed (SIGKILL of its second process) once checkpoint-3 is written, and
    # started again: it must still end as the one process does
    broken = root / "full2"
    victim_log = open(root / "victim.log", "w")  # a file: nobody reads a pipe while it runs
    victim = subprocess.Popen(_torchrun({**full_args, "output_dir": broken}), env=env,
                              stdout=victim_log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not (broken / "checkpoint-3").is_dir():
        assert victim.poll() is None, "the run to kill ended before its checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)
    rank1 = [p for p in psutil.Process(victim.pid).children() if p.environ().get("LOCAL_RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].kill()
    assert victim.wait(timeout=600) != 0
    victim_log.close()
    assert not (broken / "model.safetensors").exists(), "killed too late to prove anything"
    for kind in ("lora", "full"):  # the oracles, in this process meanwhile (the full one's
        # checkpoint-3 holds one process's whole optimizer state, to compare the shards with)
        saves = {"save_strategy": "steps", "save_steps": 3, **FULL} if kind == "full" else LORA
        train(_config({**common, "per_device_train_batch_size": 8, "finetuning_type": kind,
                       "output_dir": str(root / f"{kind}1"), **saves}))
    output, _ = lora.communicate(timeout=600)
    assert lora.returncode == 0, output[-3000:]
    # the same command again finds checkpoint-3 and resumes from it
    resumed = subprocess.run(_torchrun({**full_args, "output_dir": broken}), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, output, resumed.stdout, common


def _torchrun(values: dict) -> list[str]:
    # a port of its own: other tests may run torchrun at the same time (pytest-xdist's workers)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "tuneforge", "train", *_argv(values)]


def _config(values: dict):
    from tuneforge.config import load_config

    return load_config(None, values)


@pytest.mark.parametrize("kind, weights", [("lora", "adapter_model.safetensors"), ("full", "model.safetensors")])
def test_fsdp2_two_processes_equal_one_with_the_same_global_batch(runs, kind, weights):
    root, _, _, _ = runs
    two, one = root / f"{kind}2", root / f"{kind}1"
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)  # each of the 6 steps
    a, b = load_file(str(two / weights)), load_file(str(one / weights))
    assert sorted(a) == sorted(b)  # the ordinary peft / HF files, gathered whole
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst <= 1e-5, worst  # fp32, 6 Adam steps
    assert len(_losses(two)) == 6 and _losses(two)[-1] < _losses(two)[0]  # it trained
    if kind == "lora":  # QLoRA; the norms saved whole (modules_to_save), in the checkpoint's adapter too
        norms = sorted(k for k in a if k.endswith("norm.weight"))
        assert len(norms) == 5 and all(a[k].shape == (64,) for k in norms)
        saved = load_file(str(two / "checkpoint-3" / weights))
        assert sorted(k for k in saved if k.endswith("norm.weight")) == norms


def test_force_torchrun_relaunches_under_torchrun(runs):
    """`tuneforge train` with FORCE_TORCHRUN=1 started torchrun with NPROC_PER_NODE processes (the
    LoRA run above equals the 8-example batch only with both of its 4-example halves)."""
    _, output, _, _ = runs
    assert "starting 2 processes per node on 1 node(s) under torchrun" in output
    # every process loads the same model and data: each info line is printed once, by rank 0
    assert output.count("quantized 14 linear layers to 4-bit nf4") == 1  # the QLoRA run
    lines = [line for line in output.splitlines() if line.startswith("[tuneforge]")]
    assert len(lines) == len(set(lines)), output[-3000:]


def test_a_survivor_of_a_killed_process_promises_no_checkpoint(runs):
    """The full run's second process was SIGKILLed: torchrun stops the first with SIGTERM, which
    then cannot save (its peer is gone); it never says it will, and when its collective fails it
    names the last complete checkpoint (unless gloo's error came before the launcher's SIGTERM)."""
    root, _, _, _ = runs
    output = (root / "victim.log").read_text()
    assert "finishing the current step to save a checkpoint" not in output, output[-3000:]
    if "SIGTERM: the launcher is stopping the run" in output:
        assert "another process is gone" in output or "stopped by SIGTERM; saved" in output, output[-3000:]


def test_fsdp2_killed_run_resumes_from_its_checkpoint(runs):
    """The full run above was killed after checkpoint-3 and resumed from it (its end equals one
    process's: test_fsdp2_two_processes_equal_one_with_the_same_global_batch[full])."""
    root, _, resumed_output, _ = runs
    assert f"resumed from {root / 'full2' / 'checkpoint-3'} at step 3" in resumed_output
    saved = torch.load(root / "full2" / "checkpoint-3" / "rng_state.pt", weights_only=True)
    assert len(saved["ranks"]) == 2  # each process's RNG states


def test_fsdp2_checkpoint_holds_each_process_optimizer_shard(runs):
    """checkpoint-3 of the FSDP2 run holds one optimizer shard file per process and no whole
    optimizer.pt; read together (torch.distributed.checkpoint, here in one process: it reshards)
    they are the optimizer state one process has after the same 3 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    root, _, _, _ = runs
    checkpoint, oracle = root / "full2" / "checkpoint-3", root / "full1" / "checkpoint-3"
    shards = checkpoint / "optimizer_shards"
    assert not (checkpoint / "optimizer.pt").exists()
    assert sorted(p.name for p in shards.iterdir()) == [
        "param_groups.pt", "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors"]
    for shard in shards.glob("shard-*"):  # each only its process's part
        assert shard.stat().st_size < 0.75 * sum(p.stat().st_size for p in shards.glob("shard-*"))
    entries = HuggingFaceStorageReader(str(shards)).read_metadata().state_dict_metadata
    state = {key: torch.zeros(entry.size) for key, entry in entries.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(shards)))
    whole = torch.load(oracle / "optimizer.pt", weights_only=True)
    groups = torch.load(shards / "param_groups.pt", weights_only=True)
    names = [name for group in groups for name in group["params"]]  # the same order: same setup
    indices = [index for group in whole["param_groups"] for index in group["params"]]
    assert len(names) == len(indices) == len(whole["state"])
    worst = 0.0
    for name, index in zip(names, indices):
        assert float(state[f"{name}.step"]) == 3.0
        for moment in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, (state[f"{name}.{moment}"] - whole["state"][index][moment]).abs().max().item())
    assert worst <= 1e-5, worst


def test_a_sharded_checkpoint_resumed_by_another_number_of_processes_is_refused(runs, tmp_path):
    """The data position of 2 processes means other examples for 1: one line names both counts."""
    from tuneforge.errors import CheckpointError

    root, _, _, common = runs
    with pytest.raises(CheckpointError, match="world_size 2 and this run has 1.*launch it on 2 processes"):
        train(_config({**common, "per_device_train_batch_size": 4, "finetuning_type": "full",
                       "output_dir": str(tmp_path / "one"),
                       "resume_from_checkpoint": str(root / "full2" / "checkpoint-3")}))


@pytest.mark.parametrize("damage, problem", [
    ("drop 1", "lacks the optimizer shard of process 0"),
    ("drop 2", "a process's shard file is missing"),
    ("truncate 2", "shard-00002-model-00001-of-00001.safetensors"),
    ("drop groups", "lacks optimizer_shards/param_groups.pt"),
])
def test_a_damaged_or_incomplete_sharded_checkpoint_is_refused(runs, tmp_path, damage, problem):
    import shutil

    from tuneforge.train.integrity import checkpoint_problem

    root, _, _, _ = runs
    copy = tmp_path / "checkpoint-3"
    shutil.copytree(root / "full2" / "checkpoint-3", copy)
    assert checkpoint_problem(copy) is None
    action, which = damage.split()
    shards = copy / "optimizer_shards"
    target = shards / ("param_groups.pt" if which == "groups" else f"shard-0000{which}-model-00001-of-00001.safetensors")
    if action == "drop":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-100])
    found = checkpoint_problem(copy)
    assert found is not None and "\n" not in found
    assert re.search(problem, found), found
