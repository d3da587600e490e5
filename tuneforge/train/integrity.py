"""Can a checkpoint resume training? Every file a resume reads is checked before anything is
loaded or written: trainer_state.json parses, has its fields with their types and agrees with
itself and with the folder's name (checkpoint-<global_step>, no leading zeros; global_step within
its total_steps and matching micro_batches_seen), each safetensors header matches its file's
size and each torch file's zip directory is whole (weightfiles.py, the project's checks for
weight files), each torch file unpickles with weights_only=True from a memory map, every
tensor of the weights and the optimizer state is finite, and the optimizer state is for the
weights beside it (as many parameters, of their shapes). A sharded optimizer state
(optimizer_shards/, one safetensors file per process) is checked the same way, file by file, and
its pieces must cover every whole tensor (a process's file missing or cut short is found).
A checkpoint-N folder that fails is "damaged"; the answer names the file and what is wrong."""

from __future__ import annotations

import json
import math
import pickle
import re
from collections import Counter
from pathlib import Path

import torch

from .. import weightfiles
from ..errors import CheckpointError
from ..fileio import one_line
from .checkpoint import (GROUPS, OPTIMIZER, OPTIMIZER_SHARDS, PREFIX, SHARD_GLOB, STATE, TRAINING_FILES,
                         WEIGHTS, step_of)
from .optimizers.keys import STATE_LAYOUT

WHAT = "checkpoint file"
# weightfiles' advice for a downloaded file; a checkpoint is not downloaded again
_REDO = "; download, copy or save it again"

# fields a resume cannot do without, and the types they must have
STATE_FIELDS = {"global_step": int, "micro_batches_seen": int}
# fields that may be missing (older checkpoints), with the types they must have when present
OPTIONAL_FIELDS = {"total_steps": int, "epoch": (int, float), "seed": int, "data": dict,
                   "model_only": bool, "schedule": dict}


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


def _check_numbers(path: Path, values: dict) -> str | None:
    """trainer_state.json against the folder's name and itself: a copy renamed checkpoint-007
    or an edited global_step would otherwise be taken for another step."""
    step, where = values["global_step"], path / STATE
    named = step_of(path)
    if named is not None and named != step:
        return (f"'{path}' is named for step {named} but its {STATE} records global_step "
                f"{step} (renamed, or the file edited)")
    if named is not None and path.name != f"{PREFIX}{step}":
        return f"'{path}' is not named as tuneforge names the checkpoint of step {step} " \
               f"({PREFIX}{step})"
    total = values.get("total_steps")
    if total and step > total:
        return f"{WHAT} '{where}' records global_step {step}, past its total_steps {total} (edited?)"
    accumulation = (values.get("data") or {}).get("gradient_accumulation_steps")
    seen = values["micro_batches_seen"]
    if isinstance(accumulation, int) and accumulation > 0 and seen != step * accumulation:
        return (f"{WHAT} '{where}' records global_step {step} but micro_batches_seen {seen}, "
                f"which with gradient_accumulation_steps {accumulation} means step "
                f"{seen / accumulation:g} (edited?)")
    return None


def _non_finite(tensors, where: Path) -> str | None:
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return f"{WHAT} '{where}' holds {bad:,} NaN or inf value(s) in '{name}'"
    return None


def _check_weights_content(path: Path) -> tuple[str | None, list]:
    """Every tensor finite, read one at a time; returns the tensors' shapes."""
    from safetensors import safe_open

    shapes = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors file, not a dict
                tensor = f.get_tensor(name)
                shapes.append(tuple(tensor.shape))
                problem = _non_finite([(name, tensor)], path)
                if problem:
                    return problem, shapes
    except Exception as exc:  # noqa: BLE001 - the library's errors for a bad table mean damage
        return f"{WHAT} '{path}' is damaged ({one_line(exc, 160)})", shapes
    return None, shapes


def _check_optimizer(path: Path, state, weight_shapes: list) -> str | None:
    """The optimizer state belongs to the weights beside it: one entry per weight tensor,
    each moment of a weight's shape, every value finite."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    entries = state.get("state") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(entries, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return f"{WHAT} '{path}' is not an optimizer state (no param_groups / state)"
    # an optimizer with its own layout (GaLore's low-rank moments, BAdam's one block): only finite
    own_layout = state.get(STATE_LAYOUT) is not None
    count = sum(len(g["params"]) for g in groups)
    if count != len(weight_shapes) and not own_layout:
        return (f"{WHAT} '{path}' is the optimizer state of {count} parameter(s) but "
                f"{WEIGHTS} beside it holds {len(weight_shapes)} (from another run?)")
    moments = Counter()
    for index, entry in entries.items():
        tensors = [(f"{index}.{k}", v) for k, v in (entry.items() if isinstance(entry, dict)
                                                    else ()) if isinstance(v, torch.Tensor)]
        shapes = {tuple(v.shape) for _, v in tensors if v.ndim}
        if len(shapes) > 1 and not own_layout:
            return f"{WHAT} '{path}' holds moments of different shapes for one parameter"
        moments.update(shapes)
        problem = _non_finite(tensors, path)
        if problem:
            return problem
    extra = moments - Counter(weight_shapes)
    if extra and not own_layout:
        shape = next(iter(extra))
        return (f"{WHAT} '{path}' holds optimizer state of shape {shape}, which no weight in "
                f"{WEIGHTS} beside it has (from another run?)")
    return None


def _named_shapes(path: Path) -> dict[str, tuple]:
    """Each tensor's shape in safetensors file `path` (checked whole before), read off its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def _check_shards(folder: Path, groups, weight_shapes: dict) -> str | None:
    """optimizer_shards/: shard files numbered 1..N without a gap, each whole and finite; their
    pieces (where each sits is in the file's header, torch.distributed.checkpoint's
    HuggingFaceStorageReader reads it) cover every whole tensor; one entry per weight beside it,
    its moments of that weight's shape; the parameter groups name them all."""
    where = folder / GROUPS
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        return f"{WHAT} '{where}' does not hold an optimizer's parameter groups"
    files = sorted(folder.glob(SHARD_GLOB))
    numbers = sorted(int(m.group(1)) for f in files if (m := re.match(r"shard-(\d+)-", f.name)))
    if not numbers:
        return f"'{folder}' holds no optimizer shard file ({SHARD_GLOB})"
    gap = next((n for n in range(1, numbers[-1] + 1) if n not in numbers), None)
    if gap is not None:
        return f"'{folder}' lacks the optimizer shard of process {gap - 1} (shard-{gap:05d}-...)"
    for file in files:
        problem = _weights_check(weightfiles.check_safetensors, file) or _check_weights_content(file)[0]
        if problem:
            return problem
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    try:
        entries = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - a header that does not describe the pieces means damage
        return f"{WHAT} '{folder}' has damaged shard headers ({one_line(exc, 160)})"
    names = {name for g in groups for name in g["params"]}
    if len(names) != len(weight_shapes):
        return (f"{WHAT} '{where}' is the optimizer state of {len(names)} parameter(s) but "
                f"{WEIGHTS} beside it holds {len(weight_shapes)} (from another run?)")
    for key, entry in entries.items():
        name = key.rsplit(".", 1)[0]
        if name not in names or name not in weight_shapes:
            return (f"{WHAT} '{folder}' holds optimizer state for '{name}', which {GROUPS} or {WEIGHTS} "
                    "beside it does not name (from another run?)")
        # the whole tensor's size is not in the headers (torch reads it off the pieces): a moment
        # is checked against its weight
        size = weight_shapes[name] if len(entry.size) else ()
        if len(entry.size) and not _inside(tuple(entry.size), size):
            return (f"{WHAT} '{folder}' holds optimizer state of shape {tuple(entry.size)} for '{name}', "
                    f"whose weight in {WEIGHTS} has shape {size} (from another run?)")
        covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if covered != math.prod(size):
            return (f"'{folder}' holds {covered:,} of the {math.prod(size):,} values of '{key}' "
                    "(a process's shard file is missing or from another save)")
    missing = sorted(names - {key.rsplit(".", 1)[0] for key in entries})
    if missing:
        return f"'{folder}' holds no optimizer state for '{missing[0]}' (a process's shard file is missing)"
    return None


def _inside(seen: tuple, whole: tuple) -> bool:
    """A size torch inferred from the pieces present, within the whole one (pieces missing)."""
    return len(seen) == len(whole) and all(a <= b for a, b in zip(seen, whole))


def _weights_check(check, path: Path) -> str | None:
    try:
        check(path, WHAT, CheckpointError)
    except CheckpointError as exc:
        return str(exc).removesuffix(_REDO)
    return None


def _check_torch(path: Path) -> tuple[str | None, object]:
    """(problem, the unpickled object, whose storages stay on disk: a memory map)."""
    problem = _weights_check(weightfiles.check_torch_file, path)
    if problem:
        return problem, None
    try:
        return None, torch.load(path, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        return weightfiles.refused_pickle(path, WHAT, str(exc)), None
    except Exception as exc:  # noqa: BLE001 - zip, pickle and OS errors all mean a damaged file
        return f"{WHAT} '{path}' is damaged or truncated ({one_line(exc, 160)})", None


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
    problem = _check_numbers(path, values)
    if problem:
        return problem
    if values.get("model_only"):
        return f"'{path}' was saved with save_only_model: true and has no optimizer state"
    if not (path / WEIGHTS).is_file():
        return f"'{path}' lacks {WEIGHTS}"
    shards = path / OPTIMIZER_SHARDS
    training_files = TRAINING_FILES if not shards.is_dir() else \
        tuple(n for n in TRAINING_FILES if n != OPTIMIZER) + (f"{OPTIMIZER_SHARDS}/{GROUPS}",)
    for name in training_files:
        if not (path / name).is_file():
            return f"'{path}' lacks {name} (saved with save_only_model?)"
    files = sorted(path.glob("*.safetensors"))  # the weights, the adapter, PiSSA's initial state
    for file in files:
        problem = _weights_check(weightfiles.check_safetensors, file)
        if problem:
            return problem
    loaded = {}
    for name in training_files:
        problem, loaded[name] = _check_torch(path / name)
        if problem:
            return problem
    shapes = []
    for file in files:
        problem, found = _check_weights_content(file)
        if problem:
            return problem
        shapes = found if file.name == WEIGHTS else shapes
    if shards.is_dir():
        return _check_shards(shards, loaded[f"{OPTIMIZER_SHARDS}/{GROUPS}"], _named_shapes(path / WEIGHTS))
    return _check_optimizer(path / OPTIMIZER, loaded[OPTIMIZER], shapes)

