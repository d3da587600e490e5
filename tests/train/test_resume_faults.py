"""Resuming through `tuneforge train` on a tiny model when something is wrong: a damaged newest
checkpoint is passed over (one warning) and the run still ends equal to an uninterrupted one;
every refusal (no intact checkpoint, a damaged explicit path, a changed batch size, accumulation,
seed or dataset, a model the checkpoint does not fit, an unusable output_dir) is one line with
exit code 2 and leaves output_dir byte for byte as it was; NaN/inf stop the run without saving
them."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

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


def test_a_damaged_newest_checkpoint_is_passed_over_and_the_run_ends_equal(
        finished, tmp_path, tiny_model_dir, caplog, capsys):
    out, cfg = copy_run(finished, tmp_path, tiny_model_dir)
    killed_after(out, 3)
    data = (out / "checkpoint-3" / "optimizer.pt").read_bytes()
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(data[:len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        assert main(["train", str(cfg)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert (f"checkpoint file '{out / 'checkpoint-3' / 'optimizer.pt'}' is truncated: its zip "
            "directory (the end of a torch.save file) is missing") in warnings[0]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert_same_adapter(finished / "run", out)


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
