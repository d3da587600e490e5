"""Can a checkpoint resume training? Every file a resume reads is opened the cheap way before
anything is loaded or written: trainer_state.json parses and has its fields, each safetensors
header matches its file's size, and each torch file unpickles with weights_only=True from a
memory map (a truncated zip has lost its central directory, so this reads no tensor data).
A checkpoint-N folder that fails is "damaged"; the answer names the file and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import STATE, TRAINING_FILES, WEIGHTS

# fields a resume cannot do without, and the types they must have
STATE_FIELDS = {"global_step": int, "micro_batches_seen": int}
# fields that may be missing (older checkpoints), with the types they must have when present
OPTIONAL_FIELDS = {"total_steps": int, "epoch": (int, float), "seed": int, "data": dict,
                   "model_only": bool}


def _size(path: Path) -> str:
    size = path.stat().st_size
    return "is empty (0 bytes)" if size == 0 else f"is truncated or corrupt ({size:,} bytes)"


def _check_state(path: Path) -> tuple[str | None, dict]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"'{path}' is not text (corrupt)", {}
    except json.JSONDecodeError as exc:
        if not path.stat().st_size:
            return f"'{path}' is empty (0 bytes)", {}
        return f"'{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: " \
               f"truncated or corrupt)", {}
    if not isinstance(values, dict):
        return f"'{path}' does not hold a JSON object", {}
    for key, kind in STATE_FIELDS.items():
        value = values.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            return f"'{path}' lacks a valid '{key}'", {}
    for key, kind in OPTIONAL_FIELDS.items():
        value = values.get(key)
        if value is not None and (not isinstance(value, kind) or
                                  (isinstance(value, bool) and kind is not bool)):
            return f"'{path}' has an invalid '{key}' ({type(value).__name__})", {}
    return None, values


def _check_safetensors(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - safetensors raises its own error type for every damage
        return f"'{path}' {_size(path)}"
    return None


def _check_torch(path: Path) -> str | None:
    try:
        torch.load(path, weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - zip, pickle and OS errors all mean the file is damaged
        return f"'{path}' {_size(path)}"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint folder `path` cannot resume training, naming the file; None if it can.
    Raises nothing: a file that cannot even be opened is a problem like any other."""
    try:
        return _problem(Path(path))
    except OSError as exc:
        where = exc.filename or path
        return f"'{where}' cannot be read ({exc.strerror or type(exc).__name__})"


def _problem(path: Path) -> str | None:
    if not path.is_dir():
        return f"'{path}' is not a folder"
    state_file = path / STATE
    if not state_file.is_file():
        return f"'{path}' lacks {STATE}"
    problem, values = _check_state(state_file)
    if problem:
        return problem
    if values.get("model_only"):
        return f"'{path}' was saved with save_only_model: true and has no optimizer state"
    if not (path / WEIGHTS).is_file():
        return f"'{path}' lacks {WEIGHTS}"
    for name in TRAINING_FILES:
        if not (path / name).is_file():
            return f"'{path}' lacks {name} (saved with save_only_model?)"
    for file in sorted(path.glob("*.safetensors")):  # the weights, and e.g. PiSSA's initial state
        problem = _check_safetensors(file)
        if problem:
            return problem
    for name in TRAINING_FILES:
        problem = _check_torch(path / name)
        if problem:
            return problem
    return None

