"""kill -9 at the moments that matter (writing the first checkpoint, writing a later one,
renaming it into place, deleting an old one for save_total_limit, moving the final adapter into
place): the same command run again resumes from the newest intact checkpoint, or starts afresh
when the run had written only its own early files, ends equal to an uninterrupted run, and
leaves no .tmp-* / .trash-* behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import arithmetic_records, write_dataset
from tests.train.kill_at import MOMENTS
from tuneforge.cli import main

KILLER = Path(__file__).with_name("kill_at.py")
ADAPTER = "adapter_model.safetensors"


def write_config(path, model_dir, data_dir, out):
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "learning_rate": 5e-3, "max_steps": 4, "save_steps": 2, "save_total_limit": 1,
        "logging_steps": 1, "lora_rank": 4, "lora_dropout": 0.1, "disable_tqdm": True,
        "bf16": False,
    }))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("uninterrupted")
    data = write_dataset(root / "data", "arith", arithmetic_records(40))
    assert main(["train", str(write_config(root / "cfg.yaml", tiny_model_dir, data,
                                           root / "run"))]) == 0
    return root


# moment -> what the killed run left: the newest checkpoint (None: only its early files)
LEFT = {"writing the first checkpoint": None, "writing a checkpoint": 2,
        "renaming a checkpoint into place": 2, "deleting an old checkpoint": 4,
        "moving the final adapter into place": 4}


@pytest.mark.parametrize("moment", MOMENTS)
def test_the_same_command_after_kill_9_resumes_or_starts_afresh(reference, tmp_path,
                                                               tiny_model_dir, moment, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, reference / "data", out)
    victim = subprocess.run([sys.executable, str(KILLER), moment, "train", str(cfg)],
                            capture_output=True, text=True)
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert not (out / ADAPTER).exists() or moment == "moving the final adapter into place"
    intact = sorted(p.name for p in out.glob("checkpoint-*")
                    if (p / "trainer_state.json").is_file())
    assert intact == ([f"checkpoint-{LEFT[moment]}"] if LEFT[moment] else []), intact

    assert main(["train", str(cfg)]) == 0
    printed = capsys.readouterr()
    if LEFT[moment]:
        assert f"resumed from {out / f'checkpoint-{LEFT[moment]}'}" in printed.out
    else:
        assert "resumed from" not in printed.out
    want, got = load_file(str(reference / "run" / ADAPTER)), load_file(str(out / ADAPTER))
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".trash"))]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
