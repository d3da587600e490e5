"""The learning-rate schedule, built from the config (transformers' schedules, LLaMA-Factory's
keys), and on resume built the same way and moved to the checkpoint's step: the current
config's learning rates, schedule type, warmup and total steps apply to the steps still to
come. For an unchanged config that is exactly the state the checkpoint's scheduler.pt holds;
for a changed one, `changes` says what changed, for one warning line."""

from __future__ import annotations

import math
import warnings
from functools import partial

from torch.optim.lr_scheduler import LambdaLR


# The common schedules as LambdaLR factors of the step, the same functions as transformers'
# get_scheduler builds (transformers/optimization.py, tests/train/test_schedule_fns.py compares
# them); transformers.optimization imports trainer_utils, which imports peft and bitsandbytes.
def _warming(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warming(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int) -> float:
    """Half a cosine from 1 to 0 after the warmup (transformers' num_cycles=0.5)."""
    if step < warmup:
        return _warming(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def _constant(step: int, *, warmup: int, total: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int, total: int) -> float:
    return _warming(step, warmup) if step < warmup else 1.0


_FACTORS = {"linear": _linear, "cosine": _cosine, "constant": _constant,
            "constant_with_warmup": _constant_with_warmup}


def build_scheduler(optimizer, args, total_steps: int):
    """The schedule of `args` (lr_scheduler_type, warmup_steps or warmup_ratio) over
    `total_steps`, and its record for trainer_state.json ({"lr_scheduler_type", "warmup_steps"})."""
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    factor = _FACTORS.get(str(args.lr_scheduler_type))
    if factor is not None:
        scheduler = LambdaLR(optimizer, partial(factor, warmup=warmup, total=total_steps))
    else:  # the rarer schedules: transformers' own (importing it costs ~1.5 CPU s: peft, bitsandbytes)
        from transformers import get_scheduler

        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps)
    return scheduler, {"lr_scheduler_type": args.lr_scheduler_type, "warmup_steps": warmup}


def move_to(scheduler, step: int) -> None:
    """Put a freshly built schedule where `step` optimizer steps leave it: the groups' lr for
    step + 1, last_epoch and the step count as torch's step() makes them, by torch's own step()
    (so the arithmetic is the same as in an uninterrupted run)."""
    if step <= 0:
        return
    scheduler.last_epoch = step - 1
    scheduler._step_count = step  # step() makes it step + 1, as after `step` steps of a run
    with warnings.catch_warnings():
        # its "scheduler stepped before the optimizer" check: no step of the schedule is skipped
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def _lr(group: dict) -> float:
    return group.get("initial_lr", group.get("lr"))


def changes(then_groups: list[dict], now_groups: list[dict], then_state, now_state) -> list[str]:
    """What differs between a checkpoint's optimizer groups / trainer state and this run's, in
    config terms ("learning_rate 0.0001 -> 0.0005", "total steps 2 -> 3", ...). Checkpoints
    from before the schedule was recorded are compared on what they hold."""
    found = []
    if then_groups and now_groups:
        lr_then, lr_now = _lr(then_groups[0]), _lr(now_groups[0])
        if lr_then != lr_now:
            found.append(f"learning_rate {lr_then:g} -> {lr_now:g}")
        ratios_then = [_lr(g) / lr_then for g in then_groups[1:]]
        ratios_now = [_lr(g) / lr_now for g in now_groups[1:]]
        if len(ratios_then) != len(ratios_now) or not all(
                math.isclose(a, b, rel_tol=1e-9) for a, b in zip(ratios_then, ratios_now)):
            found.append("the LoRA+ groups' learning rates (loraplus_lr_ratio, "
                         "loraplus_lr_embedding)")
        for key, name in (("weight_decay", "weight_decay"), ("betas", "adam_beta1/adam_beta2"),
                          ("eps", "adam_epsilon")):
            then, now = _setting(then_groups, key), _setting(now_groups, key)
            if then != now:
                found.append(f"{name} {_show(then)} -> {_show(now)}")
    if then_state.total_steps and then_state.total_steps != now_state.total_steps:
        found.append(f"total steps {then_state.total_steps} -> {now_state.total_steps}")
    then_schedule, now_schedule = then_state.schedule or {}, now_state.schedule or {}
    for key, name in (("lr_scheduler_type", "lr_scheduler_type"), ("warmup_steps", "warmup steps")):
        if key in then_schedule and then_schedule[key] != now_schedule.get(key):
            found.append(f"{name} {then_schedule[key]} -> {now_schedule.get(key)}")
    return found


def _setting(groups: list[dict], key: str):
    """weight_decay: the config's value is the largest (1-D parameters get none); others: as
    every group has them."""
    if key == "weight_decay":
        return max(g.get(key, 0.0) for g in groups)
    value = groups[0].get(key)
    return tuple(value) if isinstance(value, list) else value


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)
