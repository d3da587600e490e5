"""Start fresh or resume, decided before anything is loaded or written.

A path resumes from it; true resumes from the newest checkpoint that can resume (integrity.py);
with neither, existing checkpoints are resumed (LLaMA-Factory's behaviour) unless
overwrite_output_dir is set. Newer damaged checkpoints are passed over with one warning line;
when none can resume, the run is refused naming the file. An output_dir holding only what the
same config's run writes before its first checkpoint (killed early) starts afresh; other
contents are refused rather than silently mixed into.

A stage that trains in rounds (stage: semi) writes each round before the last to a folder of its
own inside output_dir (Stage.round_folders); its checkpoints count with output_dir's, the newest
one across them (the latest round's) is where the run resumes, and starting over clears them.

Then, once the data are loaded, `check_not_past_the_end` refuses a checkpoint beyond this run's
last step and `check_data_record` one whose data position would mean other examples with this
run's setup; and `prepare_output_dir` is the first write."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import CheckpointError
from . import outputs
from .checkpoint import START_OVER, STATE, list_checkpoints, step_of
from .integrity import checkpoint_problem
from .reporting import LOG_FILE

log = logging.getLogger("tuneforge")
ARGS_FILE = "training_args.yaml"
# what a run writes before its first checkpoint (besides .tmp-* / .trash-* leftovers)
EARLY_FILES = {ARGS_FILE, LOG_FILE, "runs", "pissa_init"}


@dataclass
class ResumePlan:
    checkpoint: Path | None = None  # resume from it; None: start fresh
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were passed over
    clear_run: bool = False  # overwrite_output_dir: drop the previous run's checkpoints and log
    clear_start: bool = False  # the same config's run was killed before its first checkpoint
    rounds: list[Path] = field(default_factory=list)  # earlier rounds' folders (a stage in rounds)

    def warning(self) -> str | None:
        if not self.skipped:
            return None
        return (f"passing over {len(self.skipped)} checkpoint(s) that cannot resume: "
                f"{'; '.join(self.skipped)}; resuming from {self.checkpoint}")


def plan_resume(output_dir: str | Path, resume_from_checkpoint, overwrite_output_dir: bool,
                config_values: dict, rounds: list[Path] | tuple = ()) -> ResumePlan:
    """Decide how the run starts; `config_values` is what training_args.yaml would hold; `rounds`:
    the folders of a stage's rounds before the last (Stage.round_folders), in order, whose
    checkpoints are this run's too (an explicit checkpoint must then be in one of them or in
    output_dir).

    Raises CheckpointError (one line, naming the file or key) when it cannot start as asked."""
    root = Path(output_dir)
    rounds = [Path(p) for p in rounds]
    if isinstance(resume_from_checkpoint, str):
        path = _explicit(Path(resume_from_checkpoint))
        if rounds:
            _check_in_rounds(path, [*rounds, root])
        return ResumePlan(path, rounds=rounds)
    found = [path for folder in [*rounds, root] for path in list_checkpoints(folder)]
    if resume_from_checkpoint is True or (resume_from_checkpoint is None and found
                                          and not overwrite_output_dir):
        if not found:
            raise CheckpointError(f"resume_from_checkpoint is true but output_dir '{root}' has "
                                  "no checkpoint-N folder to resume from")
        plan = _newest_usable(root, found)
        plan.rounds = rounds
        return plan
    if overwrite_output_dir:
        return ResumePlan(clear_run=True, rounds=rounds)
    if found:
        raise CheckpointError(f"output_dir '{root}' has checkpoints; set "
                              "resume_from_checkpoint: true to continue or "
                              "overwrite_output_dir: true to start over")
    return _fresh(root, config_values, rounds)


def _check_in_rounds(path: Path, folders: list[Path]) -> None:
    """A stage in rounds resumes a round from a checkpoint in that round's folder only."""
    if path.resolve().parent not in {folder.resolve() for folder in folders}:
        raise CheckpointError(f"resume_from_checkpoint '{path}' is not a checkpoint of this run: a stage that "
                              f"trains in rounds resumes from a checkpoint-N folder in output_dir or in its "
                              f"rounds' folders ({', '.join(f.name for f in folders[:-1])}); or set it to true")


def _explicit(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint '{path}' does not exist; use a "
                              "checkpoint-N folder or true")
    if not (path / STATE).is_file() and step_of(path) is None:
        raise CheckpointError(f"resume_from_checkpoint '{path}' is not a checkpoint folder "
                              f"(no {STATE}); use a checkpoint-N folder or true")
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"resume_from_checkpoint '{path}' cannot resume training: "
                              f"{problem}; point it at another checkpoint-N folder, set it to "
                              f"true for the newest one that can, or {START_OVER}")
    return path


def _newest_usable(root: Path, found: list[Path]) -> ResumePlan:
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumePlan(path, skipped)
        skipped.append(problem)
    older = f" (and the {len(skipped) - 1} older checkpoint(s) cannot either)" \
        if len(skipped) > 1 else ""
    raise CheckpointError(f"no checkpoint in output_dir '{root}' can resume training: "
                          f"{skipped[0]}{older}; {START_OVER} or choose another output_dir")


def _fresh(root: Path, config_values: dict, rounds: list[Path] = ()) -> ResumePlan:
    present = _present(root)
    if not present:
        return ResumePlan()
    refusal = (f"output_dir '{root}' is not empty and has no checkpoint to resume; set "
               "overwrite_output_dir: true or choose another output_dir")
    # the rounds' folders of a run killed before its first checkpoint hold only what it writes early
    early_rounds = {f.name for f in rounds if f.parent == root and set(_present(f)) <= EARLY_FILES}
    if ARGS_FILE not in present or not set(present) - early_rounds <= EARLY_FILES:
        raise CheckpointError(refusal)
    try:
        previous = yaml.safe_load((root / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise CheckpointError(refusal) from None
    if not isinstance(previous, dict):
        raise CheckpointError(refusal)
    current = yaml.safe_load(yaml.safe_dump(config_values))
    # keys only one side knows (another tuneforge version) do not count
    changed = sorted(k for k in previous.keys() & current.keys() if previous[k] != current[k])
    if changed:
        raise CheckpointError(f"output_dir '{root}' holds the start of a run with another "
                              f"config (key '{changed[0]}' differs) and no checkpoint to resume; "
                              "set overwrite_output_dir: true or choose another output_dir")
    return ResumePlan(clear_start=True, rounds=rounds)  # the same run, killed before its first checkpoint


def _present(folder: Path) -> list[str]:
    """The names in `folder` besides a killed run's leftovers; [] when it is not a folder."""
    return sorted(p.name for p in folder.iterdir() if not outputs.is_leftover(p.name)) \
        if folder.is_dir() else []


# what the data position depends on, each with how to put it back
DATA_KEYS = {
    "world_size": "launch it on {then} processes",
    "per_device_train_batch_size": "set per_device_train_batch_size: {then}",
    "gradient_accumulation_steps": "set gradient_accumulation_steps: {then}",
    "seed": "set seed: {then}",
    "examples": "use the same dataset and data settings (cutoff_len, template, max_samples, "
                "val_size, ...) as that run",
}


def check_data_record(path: Path, saved: dict | None, current: dict) -> None:
    """Refuse a checkpoint whose micro-batch position would stand for other examples in this
    run (it would silently skip or repeat some). Checkpoints without a record resume as before.

    Raises CheckpointError naming the key that changed and how to resume."""
    if not isinstance(saved, dict):
        return
    for key, fix in DATA_KEYS.items():
        then, now = saved.get(key), current.get(key)
        if then is None or then == now:
            continue
        if key == "examples":
            n_then, n_now = saved.get("num_examples"), current.get("num_examples")
            what = (f"on other training examples ({n_then} examples then, {n_now} now)"
                    if n_then != n_now else
                    f"on other training examples ({n_now} then and now, but their tokens or "
                    "order differ)")
        else:
            what = f"with {key} {then} and this run has {now}"
        raise CheckpointError(f"cannot resume from '{path}': it was trained {what}, so its data "
                              f"position would skip or repeat examples; {fix.format(then=then)} "
                              f"to resume, or {START_OVER}")


def check_not_past_the_end(path: Path, step: int, total_steps: int, args) -> None:
    """Refuse a checkpoint beyond this run's last step: resuming it would train nothing and
    rewrite the finished run's outputs with the older config's numbers. (At the last step
    exactly, a run killed before its final save writes its final outputs.)

    Raises CheckpointError naming the checkpoint and the key that sets the length."""
    if step <= total_steps:
        return
    if args.max_steps > 0:
        limit, key = f"max_steps {args.max_steps}", "max_steps"
    else:
        steps = f"{total_steps} step" + ("s" if total_steps != 1 else "")
        limit, key = f"num_train_epochs {args.num_train_epochs:g} ({steps})", "num_train_epochs"
    raise CheckpointError(f"checkpoint '{path}' is at step {step}, past this run's {limit}: "
                          f"nothing to train; raise {key} to continue it, or {START_OVER} "
                          "(or choose another output_dir)")


def prepare_output_dir(root: Path, plan: ResumePlan, write_args) -> None:
    """The first write of a run: clear what the plan says, remove leftovers of killed runs,
    write training_args.yaml (whole or not at all) with `write_args(path)`.

    Raises CheckpointError when the disk is full or read-only."""
    with outputs.disk_errors(root, ARGS_FILE):
        found = [path for folder in [*plan.rounds, root] for path in list_checkpoints(folder)]
        if plan.clear_run and found:  # a crashed run's checkpoints go: say so, and how to keep them next time
            log.warning("overwrite_output_dir: true: starting over in %s, removing %s (to resume from a "
                        "checkpoint instead, run with overwrite_output_dir=false)", root,
                        ", ".join(str(path.relative_to(root)) for path in found))
        if plan.clear_run or plan.clear_start:
            start_afresh(root)
            for folder in plan.rounds:  # an earlier attempt's rounds: only this stage writes there
                outputs.discard(folder)
        for folder in [*plan.rounds, root]:
            outputs.remove_leftovers(folder)
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{outputs.TMP_PREFIX}{ARGS_FILE}"
        write_args(tmp)
        os.replace(tmp, root / ARGS_FILE)


def start_afresh(folder: Path) -> None:
    """Before a run (or a round) that starts from its first step: the checkpoints and log that an
    earlier attempt left in its folder go, with a killed run's leftovers (its other files it rewrites)."""
    for path in list_checkpoints(folder):
        outputs.discard(path)
    outputs.discard(folder / LOG_FILE)
    outputs.remove_leftovers(folder)
