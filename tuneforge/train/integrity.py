"""Can a checkpoint resume training? Every file a resume reads is checked the cheap way before
anything is loaded or written: trainer_state.json parses and has its fields with their types,
each safetensors header matches its file's size and each torch file's zip directory is whole
(weightfiles.py, the project's checks for weight files), and each torch file unpickles with
weights_only=True from a memory map (no tensor data is read). A checkpoint-N folder that fails
is "damaged"; the answer names the file and what is wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .. import weightfiles
from ..errors import CheckpointError
from ..fileio import one_line
from .checkpoint import STATE, TRAINING_FILES, WEIGHTS

WHAT = "checkpoint file"
# weightfiles' advice for a downloaded file; a checkpoint is not downloaded again
_REDO = "; download, copy or save it again"

# fields a resume cannot do without, and the types they must have
STATE_FIELDS = {"global_step": int, "micro_batches_seen": int}
# fields that may be missing (older checkpoints), with the types they must have when present
OPTIONAL_FIELDS = {"total_steps": int, "epoch": (int, float), "seed": int, "data": dict,
                   "model_only": bool}


def _check_state(path: Path) -> tuple[str | None, dict]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return f"{WHAT} '{path}' is not text (corrupt)", {}
    except json.JSONDecodeError as exc:
        if not path.stat().st_size:
            return f"{WHAT} '{path}' is empty", {}
        return f"{WHAT} '{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: " \
               f"truncated or corrupt)", {}
    if not isinstance(values, dict):
        return f"{WHAT} '{path}' does not hold a JSON object", {}
    for key, kind in STATE_FIELDS.items():
        value = values.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
            return f"{WHAT} '{path}' lacks a valid '{key}'", {}
    for key, kind in OPTIONAL_FIELDS.items():
        value = values.get(key)
        if value is not None and (not isinstance(value, kind) or
                                  (isinstance(value, bool) and kind is not bool)):
            return f"{WHAT} '{path}' has an invalid '{key}' ({type(value).__name__})", {}
    return None, values


def _weights_check(check, path: Path) -> str | None:
    try:
        check(path, WHAT, CheckpointError)
    except CheckpointError as exc:
        return str(exc).removesuffix(_REDO)
    return None


def _check_torch(path: Path) -> str | None:
    problem = _weights_check(weightfiles.check_torch_file, path)
    if problem:
        return problem
    try:  # unpickle the small part; the storages stay on disk (memory map)
        torch.load(path, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return weightfiles.refused_pickle(path, WHAT, str(exc))
    except Exception as exc:  # noqa: BLE001 - zip, pickle and OS errors all mean a damaged file
        return f"{WHAT} '{path}' is damaged or truncated ({one_line(exc, 160)})"
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
        problem = _weights_check(weightfiles.check_safetensors, file)
        if problem:
            return problem
    for name in TRAINING_FILES:
        problem = _check_torch(path / name)
        if problem:
            return problem
    return None

