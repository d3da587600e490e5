"""Checkpoints that survive a crash: each is written under a temporary name and renamed into
place, and removed by a rename to a trash name first, so `checkpoint-N` either exists whole or
not at all. A checkpoint holds the trainable weights, optimizer, scheduler, RNG states, what adapter
methods keep while training (AdapterMethod.training_state, e.g. AdaLoRA's scores) and the data
position (and what defines it, see `TrainingRun.data_record`). The optimizer state is one
optimizer.pt, or, when the model is sharded (FSDP2), a folder optimizer_shards/ with one file per
process (distributed.sharded.save_optimizer_shards) and the parameter groups beside them. Whether one can be trusted
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
from ..distributed import sharded
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
# the optimizer state of a sharded model: every process's shard file (torch.distributed.checkpoint's
# names, shard-<rank + 1>-model-00001-of-00001.safetensors) and the parameter groups
OPTIMIZER_SHARDS, GROUPS = "optimizer_shards", "param_groups.pt"
SHARD_GLOB = "shard-*.safetensors"
TRAINING_FILES = (OPTIMIZER, SCHEDULER, RNG)  # absent from save_only_model checkpoints (OPTIMIZER: or
# OPTIMIZER_SHARDS)
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
    # seconds of training up to this checkpoint (trainer_log's elapsed_time, train_runtime), over
    # every run that led to it, so a resumed run's clock continues; None in checkpoints written before
    elapsed_seconds: float | None = None

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


def temporary_folder(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint-<step> is written before it is renamed into place."""
    return Path(output_dir) / f"{TMP_PREFIX}{step}"


def begin_checkpoint(output_dir: str | Path, step: int) -> Path:
    """The main process empties and creates checkpoint-<step>'s temporary folder before every
    process writes its optimizer shard into it (then `save_checkpoint(..., optimizer_groups=)`).
    Raises CheckpointError when the disk is full or read-only."""
    tmp = temporary_folder(output_dir, step)
    with outputs.disk_errors(Path(output_dir), f"checkpoint-{step}"):
        outputs.discard(tmp)
        tmp.mkdir(parents=True)
    return tmp


def write_optimizer_shards(output_dir: str | Path, step: int, model, optimizer) -> list:
    """Every process writes its optimizer shard into checkpoint-<step>'s temporary folder (the
    main process began it, `begin_checkpoint`); returns the parameter groups for
    `save_checkpoint(..., optimizer_groups=)` (distributed.sharded.save_optimizer_shards).
    Raises CheckpointError (one line) when the disk is full or read-only."""
    with outputs.disk_errors(Path(output_dir), f"checkpoint-{step}", errno_only=False):
        return sharded.save_optimizer_shards(model, optimizer, temporary_folder(output_dir, step) / OPTIMIZER_SHARDS)


def save_checkpoint(output_dir: str | Path, state: TrainerState, model, optimizer, scheduler,
                    extra_writer=None, total_limit: int | None = None,
                    weights_only: bool = False, optimizer_groups: list | None = None,
                    rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint-<step> atomically. `extra_writer(dir)` adds user-facing files (e.g. the
    adapter in peft's format) so a checkpoint can be used like a final output. Several processes:
    `optimizer_groups` says the optimizer is sharded (FSDP2) and every process has written its
    shard into the temporary folder (`begin_checkpoint`, then
    distributed.sharded.save_optimizer_shards, which returns these parameter groups); they are
    saved beside the shards in place of optimizer.pt. `rng_states` are every process's RNG
    states (process 0's first). The main process calls it.

    Raises CheckpointError (one line) when the disk is full or read-only; the temporary folder
    is removed then, and on any other failure or interruption too, and earlier checkpoints are
    left as they were."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{state.global_step}"
    tmp = temporary_folder(root, state.global_step)
    if optimizer_groups is None:
        outputs.discard(tmp)
    weights = trainable_state(model)
    try:
        tmp.mkdir(parents=True, exist_ok=optimizer_groups is not None)
        save_file(weights, str(tmp / WEIGHTS))
        if optimizer_groups is not None:
            torch.save(optimizer_groups, tmp / OPTIMIZER_SHARDS / GROUPS)
        elif not weights_only:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        if not weights_only:
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


def load_checkpoint(path: str | Path, model, optimizer) -> tuple[TrainerState, dict, list[dict]]:
    """Restore the weights and the optimizer's state from a checkpoint that integrity.py
    accepted; the optimizer keeps this run's hyper-parameters (learning rates, weight decay,
    betas, eps), and the caller positions this run's schedule (schedule.py). Returns the
    checkpoint's state, its RNG states, which the caller sets last (`set_rng_state`), right
    before training, so that nothing in between consumes random numbers, and the saved
    optimizer groups' hyper-parameters (to say what changed).

    A sharded model (FSDP2) takes its shards of the whole weights, and of the optimizer state:
    from optimizer_shards/ (every process reads its pieces, distributed.sharded), or from an
    optimizer.pt holding it whole (checkpoints written before the shards). Then every process
    calls it together.

    Raises CheckpointError when it does not fit the model (another fine-tuning setup)."""
    path = Path(path)
    state = read_state(path)
    weights = weightfiles.load_safetensors(path / WEIGHTS, "checkpoint file", CheckpointError)
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' has no weights for {missing[0]} (and "
                              f"{len(missing) - 1} more): {_OTHER_SETUP}")
    for name, tensor in weights.items():
        if name not in params:
            raise CheckpointError(f"checkpoint '{path}' has weights for '{name}', which this "
                                  f"model does not have: {_OTHER_SETUP}")
        if params[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint '{path}': '{name}' has shape "
                                  f"{tuple(tensor.shape)}, the model {tuple(params[name].shape)}: "
                                  f"{_OTHER_SETUP}")
    rng = weightfiles.load_torch_file(path / RNG, "checkpoint file", CheckpointError)
    is_sharded = sharded.is_sharded(model)
    shards = path / OPTIMIZER_SHARDS
    if shards.is_dir():
        groups = weightfiles.load_torch_file(shards / GROUPS, "checkpoint file", CheckpointError)
        saved_groups = hyper_parameters(groups)
        _load_weights(model, params, weights, is_sharded)
        _load_shards(path, model, optimizer, groups)
    elif is_sharded:
        optimizer_state = weightfiles.load_torch_file(path / OPTIMIZER, "checkpoint file", CheckpointError)
        sharded.load_sharded(model, optimizer, weights, optimizer_state)
        saved_groups = hyper_parameters(optimizer_state["param_groups"])
    else:
        optimizer_state = weightfiles.load_torch_file(path / OPTIMIZER, "checkpoint file", CheckpointError)
        saved_groups = restore_state(optimizer, optimizer_state, path / OPTIMIZER)  # checks first
        _load_weights(model, params, weights, is_sharded)
    _load_method_state(path, model)
    return state, rng, saved_groups


_OTHER_SETUP = ("it was made with another fine-tuning setup (model_name_or_path, finetuning_type, "
                f"lora_rank, lora_target, ...): use that setup to resume, or {START_OVER}")


def _load_weights(model, params: dict, weights: dict, is_sharded: bool) -> None:
    if is_sharded:
        sharded.load_sharded_weights(model, weights)
        return
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def _load_shards(path: Path, model, optimizer, groups: list) -> None:
    """optimizer_shards/ into the optimizer; a checkpoint of another optimizer setup is refused."""
    inner = getattr(optimizer, "optimizer", optimizer)
    then, now = [len(g["params"]) for g in groups], [len(g["params"]) for g in inner.param_groups]
    if then != now:
        raise CheckpointError(f"checkpoint '{path}': its optimizer state has parameter groups of "
                              f"{then} parameter(s), this run's optimizer {now}: {_OTHER_SETUP}")
    try:
        sharded.load_optimizer_shards(model, optimizer, path / OPTIMIZER_SHARDS)
    except Exception as exc:  # noqa: BLE001 - torch.distributed.checkpoint's errors (missing pieces)
        raise CheckpointError(f"checkpoint '{path / OPTIMIZER_SHARDS}' does not fit this run's optimizer "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}): "
                              f"{_OTHER_SETUP}") from None


def _load_method_state(path: Path, model) -> None:
    if (path / METHOD_STATE).exists():
        training_hooks.load_training_state(
            model, weightfiles.load_safetensors(path / METHOD_STATE, "checkpoint file", CheckpointError))
