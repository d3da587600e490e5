"""`python tests/train/kill_at.py MOMENT train cfg.yaml`: run tuneforge and SIGKILL this process
at one named moment of writing or deleting, as a power cut or the OOM killer would (used by
test_kill_moments.py). Nothing of tuneforge is changed; only the moment is chosen."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_torch_save(folder: str, file: str, parent: str | None = None) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        f = Path(f)
        if f.parent.name == folder and f.name == file and (parent is None or f.parent.parent.name == parent):
            die()

    torch.save = save


def kill_at_rename(source_folder: str | None, source: str) -> None:
    real = os.replace

    def replace(src, dst):
        src = Path(src)
        if src.name == source and (source_folder is None or src.parent.name == source_folder):
            die()
        real(src, dst)

    os.replace = replace


def kill_in_delete(prefix: str) -> None:
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(prefix):
            files = sorted(path.iterdir())
            for file in files[:len(files) // 2]:
                file.unlink()
            die()
        real(path, *args, **kwargs)

    shutil.rmtree = rmtree


MOMENTS = {
    "writing the first checkpoint": lambda: kill_in_torch_save(".tmp-checkpoint-2", "optimizer.pt"),
    "writing a checkpoint": lambda: kill_in_torch_save(".tmp-checkpoint-4", "optimizer.pt"),
    "renaming a checkpoint into place": lambda: kill_at_rename(None, ".tmp-checkpoint-4"),
    "deleting an old checkpoint": lambda: kill_in_delete(".trash-checkpoint-2"),
    "moving the final adapter into place": lambda: kill_at_rename(".tmp-final",
                                                                  "adapter_model.safetensors"),
}
# stage: semi's rounds (test_semi.py): round k < last writes to output_dir/round_<k>, the last to output_dir "run"
ROUND_MOMENTS = {
    "writing round 0's first checkpoint": lambda: kill_in_torch_save(".tmp-checkpoint-2", "optimizer.pt", "round_0"),
    "renaming round 1's pseudo-labels into place": lambda: kill_at_rename("round_1", ".tmp-pseudo_labels.json"),
    "writing round 1's second checkpoint": lambda: kill_in_torch_save(".tmp-checkpoint-4", "optimizer.pt",
                                                                      "round_1"),
    "writing the last round's second checkpoint": lambda: kill_in_torch_save(".tmp-checkpoint-4", "optimizer.pt",
                                                                             "run"),
}

if __name__ == "__main__":
    {**MOMENTS, **ROUND_MOMENTS}[sys.argv[1]]()
    from tuneforge.cli import main

    sys.exit(main(sys.argv[2:]))
