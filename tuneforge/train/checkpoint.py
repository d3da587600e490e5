"""Checkpoints that survive a crash: each is written under a temporary name and renamed into
place, and removed by a rename to a trash name first, so `checkpoint-N` either exists whole or
not at all. A checkpoint holds the trainable weights, optimizer, scheduler, RNG states, what adapter
methods keep while training (AdapterMethod.training_state, e.g. AdaLoRA's scores) and the data position (and what defines it, see `TrainingRun.data_record`). Whether one can be trusted
is checked by `integrity.py`; which one a run resumes from is decided in `resume.py`."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .. import weightfiles
from ..adapters import training_hooks
from ..errors import CheckpointError
from . import outputs
from .optim import hyper_parameters, restore_state
from .outputs import list_checkpoints, step_of  # the checkpoint API, named here too

PREFIX = outputs.CHECKPOINT_PREFIX
TMP_PREFIX = outputs.TMP_PREFIX + PREFIX
WEIGHTS = "trainable_state.safetensors"
STATE = "trainer_state.json"
OPTIMIZER, SCHEDULER, RNG = "optimizer.pt", "scheduler.pt", "rng_state.pt"
# what adapter methods keep while training outside their weights (AdapterMethod.training_state)
METHOD_STATE = "adapter_training_state.safetensors"
TRAINING_FILES = (OPTIMIZER, SCHEDULER, RNG)  # absent from save_only_model checkpoints
START_OVER = "start over with overwrite_output_dir: true"


@dataclass
class TrainerState:
    global_step: int = 0
    total_steps: int = 0
    micro_batches_seen: int = 0  # position in the stream of micro-batches (epochs concatenated)
    epoch: float = 0.0
    seed: int = 42
    # what the data position depends on (batch size, accumulation, processes, seed, examples);
    # None in checkpoints written before it was recorded
    data: dict | None = None
    model_only: bool = False  # save_only_model: no optimizer, scheduler or RNG state
    # the learning-rate schedule (lr_scheduler_type, warmup_steps; total_steps is above), so a
    # resume can say what changed; None in checkpoints written before it was recorded
    schedule: dict | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights a run trains: those with requires_grad, and those an optimizer trains in turns
    (BAdam's blocks, marked `trains_in_turns`) while their requires_grad is off."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters()
            if p.requires_grad or getattr(p, "trains_in_turns", False)}


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, CUDA), as set_rng_state takes them."""
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


def set_rng_state(state: dict) -> None:
    version, gauss = state["python_pos"]
    random.setstate((version, tuple(state["python"]), gauss))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_state(saved: dict, rank: int) -> dict:
    """Process `rank`'s RNG states from a checkpoint's rng_state.pt (which holds every process's
    under "ranks" when several trained; a single process's otherwise)."""
    ranks = saved.get("ranks")
    return ranks[rank] if isinstance(ranks, list) and rank < len(ranks) else saved


def save_checkpoint(output_dir: str | Path, state: TrainerState, model, optimizer, scheduler,
                    extra_writer=None, total_limit: int | None = None,
                    weights_only: bool = False, optimizer_state: dict | None = None,
                    rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint-<step> atomically. `extra_writer(dir)` adds user-facing files (e.g. the
    adapter in peft's format) so a checkpoint can be used like a final output. Several processes:
    `optimizer_state` is the optimizer's whole state when it is sharded (FSDP2; else
    optimizer.state_dict()), `rng_states` every process's RNG states (process 0's first), all
    written by the main process.

    Raises CheckpointError (one line) when the disk is full or read-only; the temporary folder
    is removed then, and on any other failure or interruption too, and earlier checkpoints are
    left as they were."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{state.global_step}"
    tmp = root / f"{TMP_PREFIX}{state.global_step}"
    outputs.discard(tmp)
    weights = trainable_state(model)
    try:
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS))
        if not weights_only:
            torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / OPTIMIZER)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            torch.save({**rng_states[0], "ranks": rng_states} if rng_states else rng_state(), tmp / RNG)
            method_state = training_hooks.training_state(model)
            if method_state:
                save_file(method_state, str(tmp / METHOD_STATE))
        if extra_writer is not None:
            extra_writer(tmp)
        # trainer_state.json last: it is what integrity.py reads first
        (tmp / STATE).write_text(json.dumps(asdict(dataclasses.replace(
            state, model_only=weights_only)), indent=2))
        outputs.fsync_tree(tmp)
    except BaseException as exc:
        # KeyboardInterrupt / SystemExit: only clean up
        fault = outputs.disk_fault(exc, root) if isinstance(exc, Exception) else None
        outputs.discard(tmp)
        if fault is not None:
            raise outputs.disk_error(fault, root, f"checkpoint-{state.global_step}",
                                     _estimate(root, final, weights, weights_only)) from None
        raise
    outputs.discard(final)  # a damaged checkpoint of this step, passed over by the resume
    os.replace(tmp, final)
    outputs.fsync_tree(root)
    if total_limit:
        _rotate(root, state.global_step, total_limit)
    return final


def _rotate(root: Path, step: int, total_limit: int) -> None:
    """save_total_limit: keep the newest `total_limit` checkpoints up to `step` (the one just
    saved among them). Only tuneforge's own names are removed, and none beyond `step` (a
    damaged one passed over, or a folder someone named checkpoint-N): they are not this run's."""
    older = [p for p in list_checkpoints(root)
             if step_of(p) < step and p.name == f"{PREFIX}{step_of(p)}"]
    for old in older[:max(0, len(older) - (total_limit - 1))]:
        outputs.discard(old)


def _estimate(root: Path, final: Path, weights: dict, weights_only: bool) -> int | None:
    """About how many bytes a checkpoint takes: the previous one's size, else the weights
    (three times over with Adam's two moments)."""
    previous = [p for p in list_checkpoints(root) if p != final]
    if previous:
        return outputs.tree_size(previous[-1]) or None
    size = sum(t.numel() * t.element_size() for t in weights.values())
    return (size if weights_only else 3 * size) or None


def _load(path: Path, reader):
    """Read trainer_state.json; a failure names the file (integrity.py checked it, so this is
    rare: a file damaged in between)."""
    try:
        return reader(path)
    except Exception as exc:  # noqa: BLE001 - every reader's failure means the same to the user
        raise CheckpointError(f"checkpoint file '{path}' cannot be read ({type(exc).__name__}); "
                              "delete that checkpoint folder to resume from an earlier one, or "
                              f"{START_OVER}") from None


def read_state(path: str | Path) -> TrainerState:
    """The trainer_state.json of checkpoint folder `path`; raises CheckpointError naming the
    file when it cannot be read."""
    return TrainerState.from_dict(_load(Path(path) / STATE, lambda p: json.loads(p.read_text())))


def load_checkpoint(path: str | Path, model, optimizer, sharded_load=None) -> tuple[TrainerState, dict, list[dict]]:
    """Restore the weights and the optimizer's state from a checkpoint that integrity.py
    accepted; the optimizer keeps this run's hyper-parameters (learning rates, weight decay,
    betas, eps), and the caller positions this run's schedule (schedule.py). Returns the
    checkpoint's state, its RNG states, which the caller sets last (`set_rng_state`), right
    before training, so that nothing in between consumes random numbers, and the saved
    optimizer groups' hyper-parameters (to say what changed).

    `sharded_load(weights, optimizer_state)` puts them into a sharded model (FSDP2: every process
    takes its shards, distributed.sharded.load_sharded) after the checks, in place of copying.

    Raises CheckpointError when it does not fit the model (another fine-tuning setup)."""
    path = Path(path)
    state = read_state(path)
    weights = weightfiles.load_safetensors(path / WEIGHTS, "checkpoint file", CheckpointError)
    params = dict(model.named_parameters())
    other_setup = ("it was made with another fine-tuning setup (model_name_or_path, "
                   "finetuning_type, lora_rank, lora_target, ...): use that setup to resume, or "
                   f"{START_OVER}")
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' has no weights for {missing[0]} (and "
                              f"{len(missing) - 1} more): {other_setup}")
    for name, tensor in weights.items():
        if name not in params:
            raise CheckpointError(f"checkpoint '{path}' has weights for '{name}', which this "
                                  f"model does not have: {other_setup}")
        if params[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint '{path}': '{name}' has shape "
                                  f"{tuple(tensor.shape)}, the model {tuple(params[name].shape)}: "
                                  f"{other_setup}")
    optimizer_state, rng = (
        weightfiles.load_torch_file(path / name, "checkpoint file", CheckpointError)
        for name in (OPTIMIZER, RNG))
    if sharded_load is not None:
        sharded_load(weights, optimizer_state)
        saved_groups = hyper_parameters(optimizer_state["param_groups"])
    else:
        saved_groups = restore_state(optimizer, optimizer_state, path / OPTIMIZER)  # checks first
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
    if (path / METHOD_STATE).exists():
        training_hooks.load_training_state(
            model, weightfiles.load_safetensors(path / METHOD_STATE, "checkpoint file", CheckpointError))
    return state, rng, saved_groups
