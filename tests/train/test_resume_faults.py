"""Resuming through `tuneforge train` on a tiny model when something is wrong: a damaged newest
checkpoint is passed over (one warning) and the run still ends equal to an uninterrupted one;
every refusal (no intact checkpoint, a damaged explicit path, a changed batch size, accumulation,
seed or dataset, a model the checkpoint does not fit, an unusable output_dir) is one line with
exit code 2 and leaves output_dir byte for byte as it was; NaN/inf stop the run without saving
them."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import arithmetic_records, write_dataset
from tuneforge.cli import main

STEPS = 4
ADAPTER = "adapter_model.safetensors"


def write_config(path, model_dir, data_dir, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": STEPS,
        "save_steps": 1, "logging_steps": 1, "lora_rank": 4, "lora_dropout": 0.1,
        "disable_tqdm": True, "bf16": False, **overrides,
    }
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """One uninterrupted run (checkpoint-1 .. checkpoint-4 and the adapter), copied by tests."""
    root = tmp_path_factory.mktemp("finished")
    data = write_dataset(root / "data", "arith", arithmetic_records(40))
    assert main(["train", str(write_config(root / "cfg.yaml", tiny_model_dir, data,
                                           root / "run"))]) == 0
    return root


def copy_run(finished, tmp_path, tiny_model_dir, **overrides):
    """A copy of the finished run, with a config that names the copy (plus overrides)."""
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, finished / "data", out, **overrides)
    return out, cfg


def killed_after(out, step):
    """Make the copy look like a run killed right after saving checkpoint-<step>."""
    for path in out.glob("checkpoint-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    for name in (ADAPTER, "adapter_config.json", "train_results.json"):
        (out / name).unlink()


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("tuneforge: error:")]
    assert code == 2 and len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    return errors[0].removeprefix("tuneforge: error: ")


def assert_same_adapter(want_dir, got_dir):
    want, got = load_file(str(want_dir / ADAPTER)), load_file(str(got_dir / ADAPTER))
    assert want.keys() == got.keys()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, worst


def _truncate_optimizer(out):
    data = (out / "checkpoint-3" / "optimizer.pt").read_bytes()
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(data[:len(data) // 3])


def _nan_in_weights(out):
    """R15: a NaN in the checkpoint's weights (the adapter beside them too)."""
    for name in (ADAPTER, "trainable_state.safetensors"):
        weights = load_file(str(out / "checkpoint-3" / name))
        next(iter(weights.values())).view(-1)[0] = float("nan")
        save_file(weights, str(out / "checkpoint-3" / name))


def _edit_global_step(out):
    """R01: trainer_state.json's global_step edited."""
    path = out / "checkpoint-3" / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "global_step": 999}))


def _foreign_optimizer_state(out):
    """R14: an optimizer.pt whose moments have other shapes (as another lora_rank's do)."""
    path = out / "checkpoint-3" / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    state["state"][0] = {k: v.t().contiguous() if v.ndim else v for k, v in state["state"][0].items()}
    torch.save(state, path)


PASSED_OVER = {  # how the newest checkpoint (3) was damaged -> the words naming it
    "truncated optimizer.pt": (_truncate_optimizer, "checkpoint file '{ckpt}/optimizer.pt' is "
                               "truncated: its zip directory (the end of a torch.save file) is "
                               "missing"),
    "NaN weights": (_nan_in_weights, "checkpoint file '{ckpt}/adapter_model.safetensors' holds 1 "
                    "NaN or inf value(s) in '"),
    "edited global_step": (_edit_global_step, "'{ckpt}' is named for step 3 but its "
                           "trainer_state.json records global_step 999"),
    "optimizer state of other shapes": (_foreign_optimizer_state, "checkpoint file "
                                        "'{ckpt}/optimizer.pt' holds optimizer state of shape"),
}


@pytest.mark.parametrize("damage", PASSED_OVER)
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_ends_equal(
        finished, tmp_path, tiny_model_dir, caplog, capsys, damage):
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir)
    killed_after(out, 3)
    breaker, words = PASSED_OVER[damage]
    breaker(out)
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert main(["train", str(cfg)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert words.format(ckpt=out / "checkpoint-3") in warnings[0]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert_same_adapter(finished / "run", out)


def test_a_renamed_copy_is_not_taken_for_a_newer_step_and_nothing_is_overwritten(
        finished, tmp_path, tiny_model_dir, caplog, capsys):
    """R08: `cp -a checkpoint-1 checkpoint-007` beside intact checkpoints 1..3."""
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir)
    killed_after(out, 3)
    shutil.copytree(out / "checkpoint-1", out / "checkpoint-007")
    kept = {name: snapshot(out / name) for name in ("checkpoint-1", "checkpoint-2",
                                                    "checkpoint-3", "checkpoint-007")}
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert main(["train", str(cfg)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and (f"'{out / 'checkpoint-007'}' is named for step 7 but its "
                                   "trainer_state.json records global_step 1") in warnings[0]
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    assert {name: snapshot(out / name) for name in kept} == kept
    assert_same_adapter(finished / "run", out)


def test_a_finished_run_run_again_rewrites_no_checkpoint(finished, tmp_path, tiny_model_dir,
                                                         caplog, capsys):
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir)
    checkpoints = {p.name: snapshot(p) for p in out.glob("checkpoint-*")}
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert main(["train", str(cfg)]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # a line like the log lines: the same prefix
    assert (f"[tuneforge] resumed from {out / 'checkpoint-4'} at step 4; nothing left to train"
            in capsys.readouterr().out)
    assert {p.name: snapshot(p) for p in out.glob("checkpoint-*")} == checkpoints
    assert_same_adapter(finished / "run", out)


def test_a_resumed_run_continues_the_clock_of_its_checkpoint(finished, tmp_path, tiny_model_dir):
    """elapsed_time in trainer_log.jsonl and train_runtime continue from the checkpoint's
    elapsed_seconds (as if its 3 steps had taken an hour); a checkpoint without it (written by an
    older tuneforge) resumes with the clock at 0, as before."""
    for old in (False, True):
        out, cfg = copy_run(finished, tmp_path / str(old), tiny_model_dir)
        killed_after(out, 3)
        state_file = out / "checkpoint-3" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        assert 0 < state.pop("elapsed_seconds") < 600  # the finished run's clock at step 3
        if not old:
            state["elapsed_seconds"] = 3600.0
        state_file.write_text(json.dumps(state))
        assert main(["train", str(cfg)]) == 0
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        clock = {e["current_steps"]: e["elapsed_time"] for e in log}
        assert clock[3].startswith("0:00:")  # the first run's, kept
        runtime = json.loads((out / "train_results.json").read_text())["train_runtime"]
        saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["elapsed_seconds"]
        if old:
            assert clock[4].startswith("0:") and 0 < runtime < 600 and 0 < saved < 600
        else:
            assert clock[4].startswith("1:00:") and 3600 < runtime < 4200 and 3600 < saved < 4200


def test_a_changed_learning_rate_and_length_apply_on_resume(finished, tmp_path, tiny_model_dir,
                                                            caplog, capsys):
    """R13: a finished cosine run (its learning rate ended at 0) extended with another
    learning_rate trains on at the new schedule's rate, and one warning line says so."""
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir, max_steps=6, learning_rate=1e-2)
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert main(["train", str(cfg)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # cosine over 6 steps, no warmup, at step 4: 1e-2 * (1 + cos(pi * 4 / 6)) / 2 = 2.5e-3
    assert warnings == [f"resuming from {out / 'checkpoint-4'} with changed settings "
                        "(learning_rate 0.005 -> 0.01, total steps 4 -> 6): this run's schedule "
                        "applies, so step 5 runs at learning rate 0.0025"]
    log = {e["current_steps"]: e for e in map(json.loads, (out / "trainer_log.jsonl")
                                              .read_text().splitlines()) if "loss" in e}
    # the logged lr is the one after the step's scheduler step, as transformers logs it
    assert log[5]["lr"] == pytest.approx(1e-2 * (1 + math.cos(math.pi * 5 / 6)) / 2, rel=1e-9)
    before = load_file(str(out / "checkpoint-4" / ADAPTER))
    after = load_file(str(out / "checkpoint-5" / ADAPTER))
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-5
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["total_steps"] == 6 and state["schedule"] == {"lr_scheduler_type": "cosine",
                                                               "warmup_steps": 0}


def test_a_checkpoint_from_before_the_data_record_still_resumes(finished, tmp_path,
                                                                tiny_model_dir):
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir)
    killed_after(out, 2)
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["per_device_train_batch_size"] == 4
    del state["data"], state["model_only"]  # as tuneforge wrote it before
    state_file.write_text(json.dumps(state))
    assert main(["train", str(cfg)]) == 0
    assert_same_adapter(finished / "run", out)


def _damage_all(out):
    for path in out.glob("checkpoint-*"):
        (path / "rng_state.pt").write_bytes(b"")


REFUSALS = {  # overrides, how the copy is broken, the words of the one line
    "no intact checkpoint": ({}, _damage_all, "no checkpoint in output_dir '{out}' can resume "
                             "training: checkpoint file '{out}/checkpoint-2/rng_state.pt' is empty (and "
                             "the 1 older checkpoint(s) cannot either)"),
    "explicit damaged path": ({"resume_from_checkpoint": "{out}/checkpoint-2"},
                              lambda out: (out / "checkpoint-2" / "trainer_state.json").write_text('{"glo'),
                              "resume_from_checkpoint '{out}/checkpoint-2' cannot resume training: "
                              "checkpoint file '{out}/checkpoint-2/trainer_state.json' is not "
                              "valid JSON"),
    "batch size": ({"per_device_train_batch_size": 2, "max_steps": 8}, lambda out: None,
                   "it was trained with per_device_train_batch_size 4 and this run has 2, so its "
                   "data position would skip or repeat examples; set per_device_train_batch_size: "
                   "4 to resume, or start over with overwrite_output_dir: true"),
    "accumulation": ({"gradient_accumulation_steps": 2}, lambda out: None,
                     "set gradient_accumulation_steps: 1 to resume"),
    "seed": ({"seed": 7}, lambda out: None, "set seed: 42 to resume"),
    "dataset": ({"max_samples": 30}, lambda out: None,
                "it was trained on other training examples (40 examples then, 30 now)"),
    "another adapter setup": ({"lora_rank": 8}, lambda out: None, "has shape (4, 128), the model (8, 128): it was made with another fine-tuning setup"),
    "past max_steps": ({"max_steps": 1}, lambda out: None,
                       "checkpoint '{out}/checkpoint-2' is at step 2, past this run's max_steps 1: "
                       "nothing to train; raise max_steps to continue it, or start over with "
                       "overwrite_output_dir: true (or choose another output_dir)"),
    "past num_train_epochs": ({"max_steps": -1, "num_train_epochs": 0.1}, lambda out: None,
                              "checkpoint '{out}/checkpoint-2' is at step 2, past this run's "
                              "num_train_epochs 0.1 (1 step): nothing to train; raise "
                              "num_train_epochs to continue it"),
    "LoRA+ switched on": ({"loraplus_lr_ratio": 16.0}, lambda out: None,
                          "checkpoint '{out}/checkpoint-2/optimizer.pt' does not fit this run's "
                          "optimizer ("),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_leave_output_dir_as_it_was(finished, tmp_path, tiny_model_dir,
                                                                capsys, case):
    overrides, breaker, words = REFUSALS[case]
    out = tmp_path / "run"
    overrides = {k: v.format(out=out) if isinstance(v, str) else v for k, v in overrides.items()}
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir, **overrides)
    killed_after(out, 2)
    breaker(out)
    before = snapshot(out)
    assert words.format(out=out) in refused(capsys, ["train", str(cfg)])
    assert snapshot(out) == before


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_unusable_output_dir_is_refused_before_the_model_is_loaded(
        tmp_path, tiny_model_dir, tiny_data_dir, capsys, monkeypatch, read_only_dir, case):
    import tuneforge.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before output_dir was checked")

    monkeypatch.setattr(tuneforge.models, "load_model_and_tokenizer", no_loading)
    (tmp_path / "notes").write_text("mine")
    out, words = {
        "a file": (tmp_path / "notes", "output_dir '{out}' is a file, not a folder"),
        "under a file": (tmp_path / "notes" / "run", "output_dir '{out}' lies under "
                         f"'{tmp_path / 'notes'}', which is a file"),
        "read-only": (read_only_dir, "output_dir '{out}' is not writable ("),
    }[case]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tiny_data_dir, out)
    assert refused(capsys, ["train", str(cfg)]).startswith(words.format(out=out))
    assert (tmp_path / "notes").read_text() == "mine"


FOLDERS_READ = {  # R16, R17, R19: output_dir -> the words of the one line
    "the model's folder": (lambda model, adapter: model, {}, "is the folder of "
                           "model_name_or_path, which training reads; choose another folder"),
    "the model's folder with overwrite_output_dir": (
        lambda model, adapter: model, {"overwrite_output_dir": True},
        "is the folder of model_name_or_path, which training reads"),
    "inside the model's folder": (lambda model, adapter: model / "run", {},
                                  "lies inside the folder of model_name_or_path, which training "
                                  "reads; choose a folder outside it"),
    "the model's folder by a symlink": (lambda model, adapter: model.parent / "link", {},
                                        "is the folder of model_name_or_path"),
    "an adapter's folder": (lambda model, adapter: adapter, {"overwrite_output_dir": True},
                            "is the folder of adapter_name_or_path, which training reads"),
    "inside an adapter's folder": (lambda model, adapter: adapter / "more", {},
                                   "lies inside the folder of adapter_name_or_path"),
}


@pytest.mark.parametrize("case", FOLDERS_READ)
def test_output_dir_is_never_a_folder_training_reads(finished, tmp_path, tiny_model_dir,
                                                     tiny_data_dir, capsys, monkeypatch, case):
    import tuneforge.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before output_dir was checked")

    monkeypatch.setattr(tuneforge.models, "load_model_and_tokenizer", no_loading)
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "models" / "link").symlink_to(model)
    adapter = tmp_path / "adapter"
    shutil.copytree(finished / "run", adapter)
    where, overrides, words = FOLDERS_READ[case]
    out = where(model, adapter)
    cfg = write_config(tmp_path / "cfg.yaml", model, tiny_data_dir, out,
                       adapter_name_or_path=str(adapter), **overrides)
    before = snapshot(tmp_path)
    assert refused(capsys, ["train", str(cfg)]).startswith(f"output_dir '{out}' {words}")
    assert snapshot(tmp_path) == before


def _non_finite(directory):
    weights = load_file(str(directory / "trainable_state.safetensors"))
    return sum(int((~torch.isfinite(t)).sum()) for t in weights.values())


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir,
                                                                     tiny_data_dir, capsys):
    out = tmp_path / "run"
    # on this tiny model: the first step moves LoRA B by ~1e30, the second step's loss is NaN
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tiny_data_dir, out,
                       learning_rate=1e30, max_steps=6)
    line = refused(capsys, ["train", str(cfg)])
    assert line.startswith("training diverged: the loss is nan at step 2; nothing was saved for "
                           f"it and the last good checkpoint, {out / 'checkpoint-1'}, is kept; "
                           "lower learning_rate (now 1e+30)")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert _non_finite(out / "checkpoint-1") == 0
    assert not (out / ADAPTER).exists()
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["current_steps"] for e in log] == [1]


@pytest.mark.parametrize("when", ["at a checkpoint", "at the final save"])
def test_non_finite_weights_are_never_saved(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                            monkeypatch, when):
    """The loss of a step is taken before its update, so an update that overflows shows first
    in the weights: they are checked before every save."""
    from tuneforge.train.loop import TrainingRun

    real_step = TrainingRun.train_step

    def overflowing_step(self):
        result = real_step(self)
        if self.state.global_step == 2:
            param = next(p for p in self.model.parameters() if p.requires_grad)
            with torch.no_grad():
                param.view(-1)[:3] = float("inf")
        return result

    monkeypatch.setattr(TrainingRun, "train_step", overflowing_step)
    out = tmp_path / "run"
    overrides = {"at a checkpoint": {"max_steps": 4},
                 "at the final save": {"max_steps": 2, "save_strategy": "no"}}[when]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tiny_data_dir, out, **overrides)
    line = refused(capsys, ["train", str(cfg)])
    assert line.startswith("training diverged: 3 values of '") and \
        "' are NaN or inf after step 2; nothing was saved for it" in line
    kept = {"at a checkpoint": ["checkpoint-1"], "at the final save": []}[when]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == kept
    assert all(_non_finite(out / name) == 0 for name in kept)
    assert not (out / ADAPTER).exists()
