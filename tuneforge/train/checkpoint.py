"""Checkpoints that survive a crash: each is written under a temporary name and renamed into
place, so `checkpoint-N` either exists whole or not at all. A checkpoint holds the trainable
weights, optimizer, scheduler, RNG states and the data position."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
WEIGHTS = "trainable_state.safetensors"
STATE = "trainer_state.json"


@dataclass
class TrainerState:
    global_step: int = 0
    total_steps: int = 0
    micro_batches_seen: int = 0  # position in the stream of micro-batches (epochs concatenated)
    epoch: float = 0.0
    seed: int = 42


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = re.fullmatch(PREFIX + r"(\d+)", child.name)
        if match and child.is_dir() and (child / STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Leftovers of a run killed while writing a checkpoint."""
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[0:1] + (random.getstate()[2],),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, gauss = state["python_pos"]
    random.setstate((version, tuple(state["python"]), gauss))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, state: TrainerState, model, optimizer, scheduler,
                    extra_writer=None, total_limit: int | None = None,
                    weights_only: bool = False) -> Path:
    """Write checkpoint-<step> atomically. `extra_writer(dir)` adds user-facing files (e.g. the
    adapter in peft's format) so a checkpoint can be used like a final output."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{state.global_step}"
    tmp = root / f"{TMP_PREFIX}{state.global_step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS))
    if not weights_only:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng_state.pt")
    if extra_writer is not None:
        extra_writer(tmp)
    # trainer_state.json is written last: list_checkpoints only trusts dirs that have it
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if total_limit:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for child in [*path.iterdir(), path] if path.is_dir() else []:
        try:
            fd = os.open(child, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> TrainerState:
    """Restore everything save_checkpoint wrote; RNG states last, so nothing after consumes them."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"'{path}' is not a tuneforge checkpoint (no {STATE}); point "
                              "resume_from_checkpoint at a checkpoint-N folder or set it to true")
    for name in (WEIGHTS, "optimizer.pt", "scheduler.pt", "rng_state.pt"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint '{path}' lacks {name} (saved with save_only_model?) "
                                  "and cannot resume training")
    state = TrainerState(**json.loads((path / STATE).read_text()))
    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' has no weights for {missing[0]} (and "
                              f"{len(missing) - 1} more): it was made with another fine-tuning setup")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in params:
                raise CheckpointError(f"checkpoint '{path}' has weights for '{name}', which this "
                                      "model does not have")
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"checkpoint '{path}': '{name}' has shape "
                                      f"{tuple(tensor.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng_state.pt", weights_only=True))
    return state


def resolve_resume(output_dir: str | Path, resume_from_checkpoint, overwrite_output_dir: bool
                   ) -> Path | None:
    """Decide, before anything is written, whether this run starts fresh or resumes.

    A path resumes from it; true resumes from the latest checkpoint; with neither, existing
    checkpoints are resumed (LLaMA-Factory's behaviour) unless overwrite_output_dir is set, and
    a non-empty output_dir without checkpoints is refused rather than silently mixed into."""
    root = Path(output_dir)
    if isinstance(resume_from_checkpoint, str):
        path = Path(resume_from_checkpoint)
        if not (path / STATE).is_file():
            raise CheckpointError(f"resume_from_checkpoint '{path}' is not a checkpoint folder "
                                  f"(no {STATE}); use a checkpoint-N folder or true")
        return path
    latest = latest_checkpoint(root)
    if resume_from_checkpoint is True:
        if latest is None:
            raise CheckpointError(f"resume_from_checkpoint is true but output_dir '{root}' has "
                                  "no checkpoint-N folder to resume from")
        return latest
    if overwrite_output_dir:
        return None
    if latest is not None:
        if resume_from_checkpoint is False:
            raise CheckpointError(f"output_dir '{root}' has checkpoints; set "
                                  "resume_from_checkpoint: true to continue or "
                                  "overwrite_output_dir: true to start over")
        return latest
    if root.is_dir() and any(not p.name.startswith(TMP_PREFIX) for p in root.iterdir()):
        raise CheckpointError(f"output_dir '{root}' is not empty and has no checkpoint to resume; "
                              "set overwrite_output_dir: true or choose another output_dir")
    return None


def clear_previous_run(output_dir: str | Path) -> None:
    """Starting over in a used output_dir: drop the old checkpoints and log so that a later
    resume cannot pick up a step of the previous run."""
    root = Path(output_dir)
    for path in list_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("trainer_log.jsonl",):
        (root / name).unlink(missing_ok=True)
    remove_partial_checkpoints(root)
