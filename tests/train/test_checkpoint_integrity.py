"""Which checkpoint a run resumes from, decided before anything is loaded or written: damaged
ones (every kind of broken file) are passed over with one warning naming the file, a run with
none intact or an explicit damaged path is refused naming the file, and the output_dir rules
(a killed run's own early files start afresh). Real checkpoints of a small torch model, no
transformers model: fast."""

from __future__ import annotations

import datetime
import json
import os
import shutil

import pytest
import torch
import yaml

from tuneforge.errors import CheckpointError
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import outputs
from tuneforge.train.integrity import checkpoint_problem
from tuneforge.train.resume import ResumePlan, check_data_record, plan_resume, prepare_output_dir

CONFIG = {"output_dir": "out", "learning_rate": 0.001, "seed": 42}


def _parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def make_run(root, steps=(1, 2, 3), total_limit=None, model_only=False):
    """A run's checkpoints, written by the real save_checkpoint after real optimizer steps."""
    model, optimizer, scheduler = _parts()
    for step in range(1, max(steps) + 1):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        scheduler.step()
        if step in steps:
            state = ckpt.TrainerState(global_step=step, total_steps=max(steps),
                                      micro_batches_seen=step, data={"seed": 42})
            ckpt.save_checkpoint(root, state, model, optimizer, scheduler,
                                 total_limit=total_limit, weights_only=model_only)
    (root / "training_args.yaml").write_text(yaml.safe_dump(CONFIG))
    return root


def _edit_state(folder, **values):
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def _poison_weights(folder, value):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / ckpt.WEIGHTS))
    weights["weight"].view(-1)[5] = value
    save_file(weights, str(folder / ckpt.WEIGHTS))


def _poison_optimizer(folder):
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    state["state"][0]["exp_avg_sq"].view(-1)[:2] = float("inf")
    torch.save(state, folder / "optimizer.pt")


def _foreign_optimizer(folder, model):
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGE = {  # how a file of the newest checkpoint was broken -> the words naming it
    "truncated optimizer.pt": (lambda d: truncate(d / "optimizer.pt"), "optimizer.pt' is truncated"),
    "optimizer.pt cut by one byte": (lambda d: truncate(d / "optimizer.pt", keep=0.9999),
                                     "optimizer.pt' is truncated"),
    "rng_state.pt holding a Python object": (
        lambda d: torch.save({"when": datetime.datetime(2024, 1, 1)}, d / "rng_state.pt"),
        "rng_state.pt' holds code or Python objects besides tensors (it asks for datetime"),
    "truncated scheduler.pt": (lambda d: truncate(d / "scheduler.pt"), "scheduler.pt' is truncated"),
    "empty rng_state.pt": (lambda d: (d / "rng_state.pt").write_bytes(b""),
                           "rng_state.pt' is empty"),
    "truncated trainer_state.json": (lambda d: truncate(d / "trainer_state.json"),
                                     "trainer_state.json' is not valid JSON"),
    "empty trainer_state.json": (lambda d: (d / "trainer_state.json").write_text(""),
                                 "trainer_state.json' is empty"),
    "trainer_state.json without global_step": (
        lambda d: (d / "trainer_state.json").write_text(json.dumps({"micro_batches_seen": 3})),
        "trainer_state.json' lacks a valid 'global_step'"),
    "trainer_state.json with a text epoch": (
        lambda d: (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": 3, "micro_batches_seen": 3, "epoch": "one"})),
        "trainer_state.json' has an invalid 'epoch' (str)"),
    "trainer_state.json a list": (lambda d: (d / "trainer_state.json").write_text("[1, 2]"),
                                  "does not hold a JSON object"),
    "truncated weights": (lambda d: truncate(d / ckpt.WEIGHTS), "trainable_state.safetensors' is truncated"),
    "weights with bytes appended": (
        lambda d: (d / ckpt.WEIGHTS).write_bytes((d / ckpt.WEIGHTS).read_bytes() + b"\0" * 7),
        "trainable_state.safetensors' is damaged: its header says"),
    "weights header only": (lambda d: truncate(d / ckpt.WEIGHTS, keep=0.0001),
                            "trainable_state.safetensors' is"),
    "missing optimizer.pt": (lambda d: (d / "optimizer.pt").unlink(), "lacks optimizer.pt"),
    "missing weights": (lambda d: (d / ckpt.WEIGHTS).unlink(), "lacks trainable_state.safetensors"),
    "missing trainer_state.json (half deleted)": (lambda d: (d / "trainer_state.json").unlink(),
                                                  "lacks trainer_state.json"),
    "trainer_state.json is a folder": (lambda d: ((d / "trainer_state.json").unlink(),
                                                  (d / "trainer_state.json").mkdir()),
                                       "lacks trainer_state.json"),
    "optimizer.pt is a folder": (lambda d: ((d / "optimizer.pt").unlink(), (d / "optimizer.pt").mkdir()),
                                 "lacks optimizer.pt"),
    "only the folder is left": (lambda d: [p.unlink() for p in d.iterdir()], "lacks trainer_state.json"),
    "global_step edited": (lambda d: _edit_state(d, global_step=999),
                           "checkpoint-3' is named for step 3 but its trainer_state.json records "
                           "global_step 999 (renamed, or the file edited)"),
    "global_step past its total_steps": (lambda d: _edit_state(d, total_steps=2),
                                         "trainer_state.json' records global_step 3, past its "
                                         "total_steps 2"),
    "micro_batches_seen edited": (
        lambda d: _edit_state(d, micro_batches_seen=7, data={"gradient_accumulation_steps": 1}),
        "trainer_state.json' records global_step 3 but micro_batches_seen 7, which with "
        "gradient_accumulation_steps 1 means step 7"),
    "a NaN weight": (lambda d: _poison_weights(d, float("nan")),
                     "trainable_state.safetensors' holds 1 NaN or inf value(s) in 'weight'"),
    "an inf weight": (lambda d: _poison_weights(d, float("-inf")),
                      "trainable_state.safetensors' holds 1 NaN or inf value(s) in 'weight'"),
    "an inf Adam moment": (lambda d: _poison_optimizer(d), "optimizer.pt' holds 2 NaN or inf "
                           "value(s) in '0.exp_avg_sq'"),
    "optimizer.pt of another model (other shapes)": (
        lambda d: _foreign_optimizer(d, torch.nn.Linear(8, 2)),
        "optimizer.pt' holds optimizer state of shape (2, 8), which no weight in "
        "trainable_state.safetensors beside it has (from another run?)"),
    "optimizer.pt of another model (more parameters)": (
        lambda d: _foreign_optimizer(d, torch.nn.Sequential(torch.nn.Linear(8, 4),
                                                            torch.nn.Linear(4, 4))),
        "optimizer.pt' is the optimizer state of 4 parameter(s) but "
        "trainable_state.safetensors beside it holds 2 (from another run?)"),
    "optimizer.pt holding no optimizer state": (lambda d: torch.save({"a": 1}, d / "optimizer.pt"),
                                                "optimizer.pt' is not an optimizer state"),
}


def test_an_intact_checkpoint_has_no_problem(tmp_path):
    make_run(tmp_path)
    assert all(checkpoint_problem(p) is None for p in ckpt.list_checkpoints(tmp_path))


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_passed_over_naming_the_file(tmp_path, damage):
    make_run(tmp_path)
    breaker, words = DAMAGE[damage]
    breaker(tmp_path / "checkpoint-3")
    assert words in checkpoint_problem(tmp_path / "checkpoint-3")
    for resume in (None, True):
        plan = plan_resume(tmp_path, resume, False, CONFIG)
        assert plan.checkpoint == tmp_path / "checkpoint-2"
        warning = plan.warning()
        assert "\n" not in warning and words in warning
        assert str(tmp_path / "checkpoint-3") in warning
        assert warning.endswith(f"resuming from {tmp_path / 'checkpoint-2'}")


@pytest.mark.parametrize("damage", ["truncated optimizer.pt", "empty rng_state.pt",
                                    "missing trainer_state.json (half deleted)"])
def test_no_intact_checkpoint_is_refused_naming_the_newest_file(tmp_path, damage):
    make_run(tmp_path, steps=(1, 2))
    breaker, words = DAMAGE[damage]
    breaker(tmp_path / "checkpoint-2")
    truncate(tmp_path / "checkpoint-1" / "optimizer.pt")
    with pytest.raises(CheckpointError) as err:
        plan_resume(tmp_path, None, False, CONFIG)
    message = str(err.value)
    assert "\n" not in message and words in message and "checkpoint-2" in message
    assert "1 older checkpoint(s) cannot either" in message
    assert "overwrite_output_dir: true" in message


def test_an_explicit_damaged_checkpoint_is_refused_not_replaced(tmp_path):
    make_run(tmp_path)
    truncate(tmp_path / "checkpoint-2" / ckpt.WEIGHTS)
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint '.*checkpoint-2' cannot "
                       r"resume training: checkpoint file '.*checkpoint-2/trainable_state.safetensors' is "
                       r"truncated: its header says \d+ bytes but the file has \d+; point it at"):
        plan_resume(tmp_path, str(tmp_path / "checkpoint-2"), False, CONFIG)
    # an intact explicit one is taken even if a newer one exists
    assert plan_resume(tmp_path, str(tmp_path / "checkpoint-1"), False, CONFIG).checkpoint \
        == tmp_path / "checkpoint-1"
    with pytest.raises(CheckpointError, match="does not exist"):
        plan_resume(tmp_path, str(tmp_path / "checkpoint-9"), False, CONFIG)
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        plan_resume(tmp_path, str(tmp_path), False, CONFIG)


def test_save_only_model_checkpoints_cannot_resume(tmp_path):
    make_run(tmp_path, steps=(1, 2), model_only=True)
    with pytest.raises(CheckpointError, match="save_only_model: true and has no optimizer state"):
        plan_resume(tmp_path, True, False, CONFIG)


def test_replacing_and_rotating_checkpoints_goes_through_trash(tmp_path, monkeypatch):
    """Deletion is a rename first, so a reader never sees a half-deleted checkpoint-N."""
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((str(a), str(b))),
                                                     real_replace(a, b))[1])
    make_run(tmp_path, steps=(1, 2, 3), total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    trashed = [b for a, b in renames if a.endswith("/checkpoint-1")]
    assert len(trashed) == 1 and os.path.basename(trashed[0]).startswith(".trash-checkpoint-1")
    assert not any(outputs.is_leftover(p.name) for p in tmp_path.iterdir())


def test_leftovers_of_a_killed_run_are_ignored_then_removed(tmp_path):
    make_run(tmp_path, steps=(1, 2))
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / ".tmp-checkpoint-3")
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / ".trash-checkpoint-1-0123abcd")
    (tmp_path / ".trash-checkpoint-1-0123abcd" / "trainer_state.json").unlink()  # half deleted
    (tmp_path / ".tmp-training_args.yaml").write_text("output_dir: ou")
    plan = plan_resume(tmp_path, None, False, CONFIG)
    assert plan.checkpoint == tmp_path / "checkpoint-2" and plan.warning() is None
    prepare_output_dir(tmp_path, plan, lambda p: p.write_text(yaml.safe_dump(CONFIG)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2",
                                                          "training_args.yaml"]


def _early_files(root, config=CONFIG, extra=()):
    root.mkdir()
    (root / "training_args.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.0}\n{"curr')
    (root / ".tmp-checkpoint-5").mkdir()
    (root / ".tmp-checkpoint-5" / "optimizer.pt").write_bytes(b"PK\x03")
    for name in extra:
        (root / name).write_text("mine")
    return root


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path):
    root = _early_files(tmp_path / "out")
    plan = plan_resume(root, None, False, CONFIG)
    assert plan == ResumePlan(clear_start=True)
    prepare_output_dir(root, plan, lambda p: p.write_text(yaml.safe_dump(CONFIG)))
    assert [p.name for p in root.iterdir()] == ["training_args.yaml"]


def test_overwrite_output_dir_says_which_checkpoints_it_removes(tmp_path, caplog):
    root = tmp_path / "out"
    for step in (2, 4):
        (root / f"checkpoint-{step}").mkdir(parents=True)
    plan = plan_resume(root, None, True, CONFIG)
    assert plan == ResumePlan(clear_run=True)
    with caplog.at_level("WARNING", logger="tuneforge"):
        prepare_output_dir(root, plan, lambda p: p.write_text(yaml.safe_dump(CONFIG)))
    assert not list(root.glob("checkpoint-*"))
    assert "removing checkpoint-2, checkpoint-4" in caplog.text and "overwrite_output_dir=false" in caplog.text


@pytest.mark.parametrize("case", ["other config", "other files", "no training_args"])
def test_other_contents_without_checkpoints_are_refused_untouched(tmp_path, case):
    root = tmp_path / "out"
    if case == "other config":
        _early_files(root, {**CONFIG, "learning_rate": 0.1})
        words = "another config (key 'learning_rate' differs)"
    elif case == "other files":
        _early_files(root, extra=["notes.txt"])
        words = "is not empty and has no checkpoint to resume"
    else:
        _early_files(root)
        (root / "training_args.yaml").unlink()
        words = "is not empty and has no checkpoint to resume"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"set overwrite_output_dir: true") as err:
        plan_resume(root, None, False, CONFIG)
    assert words in str(err.value)
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("key, then, now, words", [
    ("per_device_train_batch_size", 4, 2, "set per_device_train_batch_size: 4 to resume"),
    ("gradient_accumulation_steps", 2, 1, "set gradient_accumulation_steps: 2 to resume"),
    ("world_size", 2, 1, "launch it on 2 processes to resume"),
    ("seed", 42, 7, "set seed: 42 to resume"),
    ("examples", "abc", "abd", "on other training examples (16 then and now, but their tokens "
                               "or order differ)"),
    ("num_examples", 12, 16, "on other training examples (12 examples then, 16 now)"),
])
def test_a_changed_data_position_is_refused_naming_the_key(tmp_path, key, then, now, words):
    saved = {"world_size": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
             "seed": 42, "num_examples": 16, "examples": "abc", key: then}
    current = {**saved, key: now}
    if key == "num_examples":
        saved["examples"] = "abd"
    check_data_record(tmp_path, saved, saved)
    with pytest.raises(CheckpointError) as err:
        check_data_record(tmp_path, saved, current)
    assert words in str(err.value) and "skip or repeat examples" in str(err.value)
    check_data_record(tmp_path, None, current)  # a checkpoint from before the record resumes


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Injected at the write layer (test_disk_full.py does it on a real small tmpfs)."""
    make_run(tmp_path, steps=(1,))
    model, optimizer, scheduler = _parts()
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"^disk full while writing checkpoint-2 in '.*' "
                       r"\([\d.]+ [KMGT]?B free, it needs about [\d.]+ [KMGT]?B\); free some space"):
        ckpt.save_checkpoint(tmp_path, ckpt.TrainerState(global_step=2), model, optimizer, scheduler)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert checkpoint_problem(tmp_path / "checkpoint-1") is None
    assert not any(outputs.is_leftover(p.name) for p in tmp_path.iterdir())


def test_an_interrupted_save_leaves_no_temporary_folder(tmp_path, monkeypatch):
    model, optimizer, scheduler = _parts()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, ckpt.TrainerState(global_step=1), model, optimizer, scheduler)
    assert list(tmp_path.iterdir()) == []


def test_several_damaged_checkpoints_make_one_warning_line(tmp_path):
    make_run(tmp_path)
    truncate(tmp_path / "checkpoint-3" / "optimizer.pt")
    truncate(tmp_path / "checkpoint-2" / "rng_state.pt")
    plan = plan_resume(tmp_path, None, False, CONFIG)
    assert plan.checkpoint == tmp_path / "checkpoint-1"
    warning = plan.warning()
    assert warning.startswith("passing over 2 checkpoint(s) that cannot resume: ")
    assert "\n" not in warning
    assert "checkpoint-3/optimizer.pt' is truncated" in warning
    assert "checkpoint-2/rng_state.pt' is truncated" in warning


def test_a_renamed_copy_is_passed_over_and_never_taken_for_a_newer_step(tmp_path):
    """`cp -a checkpoint-1 checkpoint-007`: by its name the newest, by its trainer_state.json
    step 1; the intact newest (checkpoint-3) is resumed and nothing is overwritten."""
    make_run(tmp_path)
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-007")
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-0005")
    plan = plan_resume(tmp_path, None, False, CONFIG)
    assert plan.checkpoint == tmp_path / "checkpoint-3"
    warning = plan.warning()
    assert warning.startswith("passing over 2 checkpoint(s) that cannot resume: ")
    assert (f"'{tmp_path / 'checkpoint-007'}' is named for step 7 but its trainer_state.json "
            "records global_step 1") in warning
    assert (f"'{tmp_path / 'checkpoint-0005'}' is named for step 5 but its trainer_state.json "
            "records global_step 2") in warning


def test_an_explicit_checkpoint_must_be_named_for_its_step(tmp_path):
    make_run(tmp_path)
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / "checkpoint-03")
    with pytest.raises(CheckpointError) as err:
        plan_resume(tmp_path, str(tmp_path / "checkpoint-03"), False, CONFIG)
    assert str(err.value) == (
        f"resume_from_checkpoint '{tmp_path / 'checkpoint-03'}' cannot resume training: "
        f"'{tmp_path / 'checkpoint-03'}' is not named as tuneforge names the checkpoint of step 3 "
        "(checkpoint-3); point it at another checkpoint-N folder, set it to true for the newest "
        "one that can, or start over with overwrite_output_dir: true")
    # a folder named otherwise (a user's copy, "best") is taken as what its state says
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "best")
    assert plan_resume(tmp_path, str(tmp_path / "best"), False, CONFIG).checkpoint == tmp_path / "best"


def test_save_total_limit_removes_only_older_checkpoints_of_tuneforge_names(tmp_path):
    """Rotation never removes the checkpoint just saved, one beyond it (passed over as damaged)
    or a folder tuneforge did not name."""
    make_run(tmp_path, steps=(1, 2))
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-9")
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-01")
    model, optimizer, scheduler = _parts()
    ckpt.save_checkpoint(tmp_path, ckpt.TrainerState(global_step=3, micro_batches_seen=3), model,
                         optimizer, scheduler, total_limit=2)
    assert sorted(p.name for p in ckpt.list_checkpoints(tmp_path)) == [
        "checkpoint-01", "checkpoint-2", "checkpoint-3", "checkpoint-9"]
    ckpt.save_checkpoint(tmp_path, ckpt.TrainerState(global_step=4, micro_batches_seen=4), model,
                         optimizer, scheduler, total_limit=1)
    assert sorted(p.name for p in ckpt.list_checkpoints(tmp_path)) == [
        "checkpoint-01", "checkpoint-4", "checkpoint-9"]
