"""On resume the optimizer takes a checkpoint's state but this run's hyper-parameters, and the
schedule is this config's, moved to the checkpoint's step. For an unchanged config that must be
exactly what loading the saved optimizer and scheduler gives (every scheduler type, warmup or
not, several learning-rate groups as LoRA+ makes them); for a changed one the new values apply
and `changes` names them. A small torch model, no transformers model: fast."""

from __future__ import annotations

from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch

from tuneforge.errors import CheckpointError
from tuneforge.train.checkpoint import TrainerState
from tuneforge.train.optim import hyper_parameters, restore_state
from tuneforge.train.schedule import build_scheduler, changes, move_to

TYPES = ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
         "polynomial", "inverse_sqrt"]


def _args(**overrides):
    values = dict(learning_rate=1e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                  adam_epsilon=1e-8, lr_scheduler_type="cosine", warmup_steps=0,
                  warmup_ratio=0.0, ratio=16.0)
    return SimpleNamespace(**{**values, **overrides})


def _parts(args, total):
    """A model and an AdamW in three groups of their own learning rates (as LoRA+ makes them)
    with weight decay on the 2-D weights, and the schedule of `args` over `total` steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    lr = args.learning_rate
    groups = [{"params": [model[0].weight], "lr": lr, "weight_decay": args.weight_decay},
              {"params": [model[1].weight], "lr": lr * args.ratio, "weight_decay": args.weight_decay},
              {"params": [model[0].bias, model[1].bias], "lr": lr * args.ratio, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    scheduler, record = build_scheduler(optimizer, args, total)
    return model, optimizer, scheduler, record


def _train(model, optimizer, scheduler, steps):
    lrs = []
    for _ in range(steps):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return lrs


def _scheduler_state(scheduler):
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("kind", TYPES)
def test_an_unchanged_config_resumes_exactly_as_loading_the_saved_schedule(kind, warmup):
    args, total, at = _args(lr_scheduler_type=kind, warmup_steps=warmup), 10, 4
    model, optimizer, scheduler, _ = _parts(args, total)
    _train(model, optimizer, scheduler, at)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}

    # the old way: load both saved states
    model_a, optimizer_a, scheduler_a, _ = _parts(args, total)
    model_a.load_state_dict(saved_model)
    optimizer_a.load_state_dict(deepcopy(saved_optimizer))  # as two torch.load calls: no sharing
    scheduler_a.load_state_dict(saved_scheduler)
    # tuneforge's: the optimizer state with this run's hyper-parameters, the schedule moved
    model_b, optimizer_b, scheduler_b, _ = _parts(args, total)
    model_b.load_state_dict(saved_model)
    restore_state(optimizer_b, deepcopy(saved_optimizer), "optimizer.pt")
    move_to(scheduler_b, at)

    assert hyper_parameters(optimizer_b.param_groups) == hyper_parameters(optimizer_a.param_groups)
    assert _scheduler_state(scheduler_b) == _scheduler_state(scheduler_a)
    torch.manual_seed(1)
    lrs_a = _train(model_a, optimizer_a, scheduler_a, total - at)
    torch.manual_seed(1)
    lrs_b = _train(model_b, optimizer_b, scheduler_b, total - at)
    assert lrs_a == lrs_b  # bit for bit, every group
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key


def test_a_changed_config_takes_its_hyper_parameters_and_schedule_from_the_step_on():
    old = _args(lr_scheduler_type="cosine")
    model, optimizer, scheduler, record = _parts(old, 4)
    _train(model, optimizer, scheduler, 4)  # finished: cosine ends at 0
    saved = optimizer.state_dict()
    new = _args(learning_rate=5e-3, weight_decay=0.1, adam_beta2=0.99, adam_epsilon=1e-6,
                lr_scheduler_type="linear", warmup_steps=1, ratio=4.0)
    _, optimizer_b, scheduler_b, record_b = _parts(new, 8)
    now_groups = hyper_parameters(optimizer_b.param_groups)
    then_groups = restore_state(optimizer_b, saved, "optimizer.pt")
    move_to(scheduler_b, 4)

    factor = (8 - 4) / (8 - 1)  # linear decay after one warmup step, at step 4 of 8
    want = [5e-3 * factor, 5e-3 * 4 * factor, 5e-3 * 4 * factor]
    assert [g["lr"] for g in optimizer_b.param_groups] == pytest.approx(want, rel=1e-12)
    assert [g["weight_decay"] for g in optimizer_b.param_groups] == [0.1, 0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in optimizer_b.param_groups)
    for index, state in saved["state"].items():  # Adam's moments and step counts kept
        param = [p for g in optimizer_b.param_groups for p in g["params"]][index]
        for key, value in state.items():
            assert torch.equal(optimizer_b.state[param][key], value), key

    then_state = TrainerState(global_step=4, total_steps=4, schedule=record)
    now_state = TrainerState(global_step=4, total_steps=8, schedule=record_b)
    assert changes(then_groups, now_groups, then_state, now_state) == [
        "learning_rate 0.001 -> 0.005",
        "the LoRA+ groups' learning rates (loraplus_lr_ratio, loraplus_lr_embedding)",
        "weight_decay 0.01 -> 0.1", "adam_beta1/adam_beta2 (0.9, 0.999) -> (0.9, 0.99)",
        "adam_epsilon 1e-08 -> 1e-06", "total steps 4 -> 8", "lr_scheduler_type cosine -> linear",
        "warmup steps 0 -> 1"]
    assert changes(then_groups, then_groups, then_state, then_state) == []


def test_changes_of_a_checkpoint_without_a_schedule_record_compare_what_it_holds():
    args = _args()
    _, optimizer, _, _ = _parts(args, 4)
    groups = hyper_parameters(optimizer.param_groups)
    old = TrainerState(global_step=2, total_steps=4)  # written before the schedule was recorded
    new = TrainerState(global_step=2, total_steps=6, schedule={"lr_scheduler_type": "linear",
                                                               "warmup_steps": 0})
    assert changes(groups, groups, old, new) == ["total steps 4 -> 6"]
    doubled = [{**g, "initial_lr": 2 * g["initial_lr"]} for g in groups]  # same ratios
    assert changes(groups, doubled, old, old) == ["learning_rate 0.001 -> 0.002"]


@pytest.mark.parametrize("case", ["other shapes", "other group sizes", "other groups", "no state"])
def test_an_optimizer_state_that_does_not_fit_is_refused_naming_the_file(case):
    args = _args()
    model, optimizer, scheduler, _ = _parts(args, 4)
    _train(model, optimizer, scheduler, 1)
    saved = optimizer.state_dict()
    if case == "other shapes":  # the same counts, a moment transposed (e.g. another rank)
        saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].t().contiguous()
        words = "its 'exp_avg' for a parameter of group 0 has shape (6, 5), the parameter (5, 6)"
    elif case == "other group sizes":
        saved["param_groups"][2]["params"] = saved["param_groups"][2]["params"][:1]
        words = "parameter group 2 has 1 parameter(s) there, 2 here"
    elif case == "other groups":  # LoRA+ switched off: fewer groups
        saved["param_groups"] = saved["param_groups"][:2]
        words = "2 parameter group(s) there, 3 here"
    else:
        saved = {"state": {}}
        words = "it is not an optimizer state"
    _, fresh, _, _ = _parts(args, 4)
    before = hyper_parameters(fresh.param_groups)
    with pytest.raises(CheckpointError) as err:
        restore_state(fresh, saved, "run/checkpoint-1/optimizer.pt")
    assert str(err.value).startswith("checkpoint 'run/checkpoint-1/optimizer.pt' does not fit "
                                     f"this run's optimizer ({words}): it was made with another "
                                     "fine-tuning setup (")
    assert hyper_parameters(fresh.param_groups) == before and not fresh.state
