"""The optimizer-shard files of FSDP2 checkpoints (distributed/sharded.py, train/checkpoint.py),
in one process without a process group (torch.distributed.checkpoint then reads and writes alone):
the round trip, a full disk as one line, a folder that does not fit this optimizer. Under two
processes they are tested by tests/train/test_fsdp.py."""

from __future__ import annotations

import errno

import pytest
import torch
from torch import nn

from tuneforge.distributed.sharded import load_optimizer_shards, save_optimizer_shards
from tuneforge.errors import CheckpointError
from tuneforge.train import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trained(lr: float = 0.1, sizes=(4, 6, 3)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(2):
        model(torch.randn(5, sizes[0])).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_optimizer_shards_round_trip_keeping_this_run_s_hyper_parameters(tmp_path):
    model, optimizer = _trained()
    groups = save_optimizer_shards(model, optimizer, tmp_path / "shards")
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-00001-model-00001-of-00001.safetensors"]
    assert groups[0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"] and groups[0]["lr"] == 0.1
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)  # this run's learning rate wins
    load_optimizer_shards(model, fresh, tmp_path / "shards")
    assert fresh.param_groups[0]["lr"] == 0.5
    for p in model.parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fresh.state[p][key], optimizer.state[p][key]), key
    assert float(fresh.state[next(model.parameters())]["step"]) == 2.0


def test_a_full_disk_while_writing_the_shards_is_one_line(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full)
    model, optimizer = _trained()
    ckpt.begin_checkpoint(tmp_path, 7)
    with pytest.raises(CheckpointError) as err:
        ckpt.write_optimizer_shards(tmp_path, 7, model, optimizer)
    assert "\n" not in str(err.value) and "checkpoint-7" in str(err.value) and "full" in str(err.value)


def _checkpoint(tmp_path, model, optimizer):
    """checkpoint-2 as the main process of an FSDP2 run writes it, here alone."""
    ckpt.begin_checkpoint(tmp_path, 2)
    groups = ckpt.write_optimizer_shards(tmp_path, 2, model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = ckpt.TrainerState(global_step=2, total_steps=4, micro_batches_seen=2)
    return ckpt.save_checkpoint(tmp_path, state, model, optimizer, scheduler, optimizer_groups=groups)


def test_a_checkpoint_with_optimizer_shards_passes_the_checks_and_resumes(tmp_path):
    from tuneforge.train.integrity import checkpoint_problem

    model, optimizer = _trained()
    path = _checkpoint(tmp_path, model, optimizer)
    assert not (path / "optimizer.pt").exists() and (path / "optimizer_shards" / "param_groups.pt").is_file()
    assert checkpoint_problem(path) is None
    again, _ = _trained(lr=0.3)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    fresh = torch.optim.AdamW(again.parameters(), lr=0.3)
    state, _, saved_groups = ckpt.load_checkpoint(path, again, fresh)
    assert state.global_step == 2 and saved_groups[0]["lr"] == 0.1 and fresh.param_groups[0]["lr"] == 0.3
    for p, q in zip(again.parameters(), model.parameters()):
        assert torch.equal(p, q) and torch.equal(fresh.state[p]["exp_avg"], optimizer.state[q]["exp_avg"])


def test_shards_of_another_optimizer_setup_are_refused_in_one_line(tmp_path):
    model, optimizer = _trained()
    path = _checkpoint(tmp_path, model, optimizer)
    params = list(model.parameters())
    split = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.1)
    with pytest.raises(CheckpointError, match="parameter groups of \\[4\\] parameter") as err:
        ckpt.load_checkpoint(path, model, split)
    assert "\n" not in str(err.value)
