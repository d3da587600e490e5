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


def kill_in_torch_save(folder: str, file: str) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if Path(f).parent.name == folder and Path(f).name == file:
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

if __name__ == "__main__":
    MOMENTS[sys.argv[1]]()
    from tuneforge.cli import main

    sys.exit(main(sys.argv[2:]))
