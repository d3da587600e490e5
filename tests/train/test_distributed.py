"""Two processes under torchrun (gloo on CPU) take the same step as one process with the
combined batch: data is sharded, token counts are summed across ranks, DDP averages gradients."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.cli import main
from tuneforge.distributed.launch import free_port

# one SGD-like step (adam_epsilon=1) shows the gradient itself in the adapter weights
STEP = ["max_steps=1", "learning_rate=1.0", "adam_epsilon=1.0", "lr_scheduler_type=constant",
        "max_grad_norm=0", "bf16=false", "disable_tqdm=true", "cutoff_len=64", "lora_rank=4",
        "gradient_accumulation_steps=2"]


def test_two_processes_equal_one_with_the_combined_batch(tmp_path, tiny_model_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    data = write_dataset(tmp_path / "data", "arith", arithmetic_records(40))
    common = [f"model_name_or_path={tiny_model_dir}", "dataset=arith", f"dataset_dir={data}", *STEP]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a port of its own: other tests may run torchrun at the same time (pytest-xdist's workers)
    two = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
                            "-m", "tuneforge", "train",
                            *common, f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=8"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # the one-process oracle runs in this process meanwhile (no second start-up of torch)
    assert main(["train", *common, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=16"]) == 0
    output, _ = two.communicate(timeout=300)
    assert two.returncode == 0, output[-3000:]
    # every process reads the same config, data and model: each line is printed once, by rank 0
    lines = [line for line in output.splitlines() if line.startswith("[tuneforge]")]
    assert lines and len(lines) == len(set(lines)), output[-3000:]
    a = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in b.items() if "lora_B" in k) > 1e-3
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst < 1e-6, worst
