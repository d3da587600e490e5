"""`optim` (LLaMA-Factory passes it to transformers' Trainer): the optimizer is the one
transformers' own factory builds for that name, with tuneforge's weight-decay / LoRA+ groups, and
trains and resumes through the loop; names the loop cannot run are refused in one line."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.optim import build_optimizer
from tuneforge.workflows import train


def _args(**kw):
    values = dict(optim="adamw_torch", optim_args=None, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999,
                  adam_epsilon=1e-8, weight_decay=0.1)
    values.update(kw)
    return SimpleNamespace(**values)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


@pytest.mark.parametrize("optim, optim_args, cls, settings", [
    ("adamw_torch", None, "torch.optim.adamw.AdamW", {"betas": (0.9, 0.999)}),
    ("sgd", "momentum=0.9", "torch.optim.sgd.SGD", {"momentum": 0.9}),
    ("adafactor", None, "transformers.optimization.Adafactor", {"relative_step": False}),
    ("adamw_8bit", None, "bitsandbytes.optim.adamw.AdamW", {"betas": (0.9, 0.999)}),
])
def test_the_optimizer_transformers_builds_with_our_groups(optim, optim_args, cls, settings):
    opt = build_optimizer(_model(), _args(optim=optim, optim_args=optim_args))
    assert f"{type(opt).__module__}.{type(opt).__name__}" == cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # 2-D weights decay, 1-D do not
    for key, value in settings.items():
        assert opt.param_groups[0][key] == value
    model = opt.param_groups[0]["params"][0]
    before = model.detach().clone()
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()  # it runs here (CPU) and moves the weights
    assert not torch.equal(before, model.detach())


@pytest.mark.parametrize("optim, message", [
    ("adamw_typo", r"^config key 'optim' must be one of transformers' optimizer names \(adamw_torch, .*\); "
                   r"got 'adamw_typo'$"),
    ("galore_adamw", r"^optim: galore_adamw runs inside transformers' Trainer"),
])
def test_optimizers_the_loop_cannot_run_are_one_line(optim, message):
    with pytest.raises(ConfigError, match=message):
        build_optimizer(_model(), _args(optim=optim))


def test_sgd_trains_and_resumes_exactly(tiny_model_dir, tiny_data_dir, tmp_path):
    def cfg(out, **extra):
        return load_config(None, {"model_name_or_path": str(tiny_model_dir), "dataset": "arith",
                                  "dataset_dir": str(tiny_data_dir), "output_dir": str(out), "cutoff_len": 64,
                                  "per_device_train_batch_size": 4, "learning_rate": 0.5, "max_steps": 4,
                                  "save_steps": 2, "optim": "sgd", "optim_args": "momentum=0.9",
                                  "disable_tqdm": True, "bf16": False, **extra})

    results = train(cfg(tmp_path / "full"))
    assert results["train_loss"] > 0
    part = tmp_path / "part"
    train(cfg(part))
    state = torch.load(part / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert all("momentum_buffer" in s for s in state["state"].values())  # SGD's own state, checkpointed
    shutil.rmtree(part / "checkpoint-4")
    train(cfg(part, resume_from_checkpoint=str(part / "checkpoint-2")))
    full, resumed = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", part))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
