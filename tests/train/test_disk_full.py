"""A full disk while saving: the previous checkpoint survives, the temporary folder is removed,
one line names the folder and the space, exit code 2, no traceback; after space is freed the
same command resumes. On a real small tmpfs where this process may mount one (root), else with
ENOSPC injected where the checkpoint is written."""

from __future__ import annotations

import errno
import re
import subprocess

import torch
import yaml

from tests.train.conftest import small_disk
from tuneforge.cli import main
from tuneforge.train.integrity import checkpoint_problem

MB = 2**20


def write_config(path, model_dir, data_dir, out, **overrides):
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "learning_rate": 5e-3, "max_steps": 3, "save_steps": 1, "logging_steps": 1,
        "lora_rank": 4, "disable_tqdm": True, "bf16": False, **overrides,
    }))
    return path


def fail_writes_into(monkeypatch, folder_name: str) -> None:
    """Without a mount: the kernel's answer to a full disk, where tuneforge writes there."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if f"/{folder_name}/" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def run_refused(capsys, cfg) -> str:
    code = main(["train", str(cfg)])
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("tuneforge: error: ")]
    assert code == 2 and len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    return errors[0].removeprefix("tuneforge: error: ")


def leftovers(out):
    return [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, tiny_data_dir,
                                                          capsys, monkeypatch):
    out = tmp_path / "disk"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tiny_data_dir, out)
    # one checkpoint (~3.6 MB, mostly tokenizer.json) fits, a second does not
    with small_disk(out, 6 * MB) as mounted:
        if not mounted:
            fail_writes_into(monkeypatch, ".tmp-checkpoint-2")
        line = run_refused(capsys, cfg)
        assert re.fullmatch(rf"disk full while writing checkpoint-2 in '{out}' \([\d.]+ [KMGT]?B free, "
                            r"it needs about [\d.]+ [KMGT]?B\); free some space and run the same "
                            r"command again to resume", line)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
        assert checkpoint_problem(out / "checkpoint-1") is None
        assert not leftovers(out) and not (out / "adapter_model.safetensors").exists()
        if mounted:  # space freed: the same command resumes from checkpoint-1 and finishes
            subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        else:
            monkeypatch.undo()
        assert main(["train", str(cfg)]) == 0
        assert f"resumed from {out / 'checkpoint-1'} at step 1" in capsys.readouterr().out
        assert (out / "adapter_model.safetensors").is_file() and not leftovers(out)


def test_disk_full_at_the_final_save_leaves_no_half_adapter(tmp_path, tiny_model_dir,
                                                            tiny_data_dir, capsys, monkeypatch):
    out = tmp_path / "disk"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tiny_data_dir, out, max_steps=1,
                       save_strategy="no", finetuning_type="freeze", freeze_trainable_layers=1)
    # the final model (~13 MB of safetensors) does not fit
    with small_disk(out, 4 * MB) as mounted:
        if not mounted:
            from transformers import PreTrainedModel

            def full(self, directory, *args, **kwargs):  # a part written, then no space
                (directory / "model.safetensors").write_bytes(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
        line = run_refused(capsys, cfg)
        assert re.fullmatch(rf"disk full while writing the final model in '{out}' \([\d.]+ [KMGT]?B "
                            r"free\); free some space .*", line), line
        assert sorted(p.name for p in out.iterdir()) == ["trainer_log.jsonl", "training_args.yaml"]


def test_the_advice_for_a_full_disk_is_only_what_can_help(tmp_path):
    """With only the newest checkpoint there (save_total_limit: 1 already, or the first save),
    nothing of the run can go: deleting older checkpoints or lowering save_total_limit is not
    suggested. With older ones, they are named with their size."""
    from tuneforge.train.outputs import disk_error

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * MB)
    line = str(disk_error("full", out, "checkpoint-3", needed=MB))
    assert re.fullmatch(rf"disk full while writing checkpoint-3 in '{out}' \([\d.]+ [KMGT]?B free, it "
                        r"needs about 1.0 MB\); free some space and run the same command again "
                        "to resume", line), line
    assert "save_total_limit" not in line
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "optimizer.pt").write_bytes(b"\0" * (MB // 2))
    assert "free some space (checkpoint-1, older than checkpoint-2, takes 512.0 KB and is not " \
           "needed to resume; save_total_limit: 1 keeps only the newest) and run the same " \
           "command again to resume" in str(disk_error("full", out, "checkpoint-3"))
    (out / "checkpoint-0").mkdir()
    assert "free some space (the 2 checkpoints older than checkpoint-2 (checkpoint-0 .. " \
           "checkpoint-1) take 512.0 KB and are not needed to resume; " in \
           str(disk_error("full", out, "the final model"))
    assert str(disk_error("read-only file system", out, "checkpoint-3")) == (
        f"cannot write checkpoint-3 in '{out}' (read-only file system); make the folder writable "
        "or choose another output_dir")
