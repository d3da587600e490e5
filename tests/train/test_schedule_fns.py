"""The common learning-rate schedules built without transformers.optimization (whose import pulls
peft and bitsandbytes into `tuneforge train`): the same learning rates as transformers'
get_scheduler, step by step, and a training run that imports neither package."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import get_scheduler

from tuneforge.train.schedule import _FACTORS, build_scheduler


@pytest.mark.parametrize("kind", sorted(_FACTORS))
@pytest.mark.parametrize("warmup, total", [(0, 12), (3, 12), (5, 5), (0, 1), (2, 7)])
def test_same_learning_rates_as_transformers(kind, warmup, total):
    def lrs(build):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler, seen = build(optimizer), []
        for _ in range(total + 2):  # past the end too
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen, scheduler

    args = SimpleNamespace(lr_scheduler_type=kind, warmup_steps=warmup, warmup_ratio=0.0)
    mine, scheduler = lrs(lambda opt: build_scheduler(opt, args, total)[0])
    theirs, _ = lrs(lambda opt: get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total))
    assert mine == pytest.approx(theirs, rel=1e-12, abs=1e-18)
    assert json.dumps(scheduler.state_dict()["lr_lambdas"]) == "[{}]"  # saved in scheduler.pt as transformers' are


def test_training_imports_neither_peft_nor_bitsandbytes(tiny_model_dir, tiny_data_dir, tmp_path):
    script = (
        "import sys\n"
        "from tuneforge.config import load_config\n"
        "from tuneforge.workflows import train\n"
        f"train(load_config(None, {{'model_name_or_path': {str(tiny_model_dir)!r}, 'dataset': 'arith', "
        f"'dataset_dir': {str(tiny_data_dir)!r}, 'output_dir': {str(tmp_path / 'out')!r}, 'cutoff_len': 32, "
        "'max_steps': 1, 'per_device_train_batch_size': 2, 'disable_tqdm': True, 'bf16': False}))\n"
        "print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers.trainer_utils') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
