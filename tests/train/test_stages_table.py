"""The stage seam: one table of stages (train/stages/) that config validation, `tuneforge keys`
and `tuneforge train` read, and a loop that runs whatever objective a stage gives it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuneforge.config import describe_keys, load_config
from tuneforge.errors import ConfigError
from tuneforge.train.stages import STAGES, Objective, Stage, get_stage, register_stage, sft
from tuneforge.workflows import train


def test_every_registered_stage_is_a_valid_stage_key_with_its_help():
    keys = describe_keys()
    for name, stage in STAGES.items():
        assert load_config(None, {"stage": name}).finetune.stage == name
        assert f"{name}: {stage.help}" in keys
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"stage": "no_such_stage"})
    assert str(caught.value) == f"config key 'stage' must be one of {', '.join(STAGES)}; got 'no_such_stage'"


def test_the_cli_lists_the_stages_without_importing_torch():
    code = ("import sys; from tuneforge.cli import main; main(['keys']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "stage (default: sft): Training stage: sft: " in done.stdout


def test_a_stage_is_registered_once_and_checks_its_kinds():
    with pytest.raises(ValueError, match="registered twice"):
        register_stage(STAGES["sft"])
    with pytest.raises(ValueError, match="records must be one of"):
        Stage("x", "", "images", sft.encode, sft.collator, sft.token_objective)
    with pytest.raises(ValueError, match="head must be one of"):
        Stage("x", "", "text", sft.encode, sft.collator, sft.token_objective, head="policy")


@pytest.fixture
def toy_stage():
    """A stage defined outside tuneforge: sft's data and loss, plus a metric of its own."""
    def objective(model, unwrapped, sample, args, autocast):
        inner = sft.token_objective(model, unwrapped, sample, args, autocast)

        def loss(run_model, batch):
            loss_sum, n, _ = inner.loss(run_model, batch)
            return loss_sum, n, {"half": n / 2}
        return Objective(loss, inner.count, ("half",))

    stage = register_stage(Stage("toy", "a test stage", "conversations", sft.encode, sft.collator,
                                 objective))
    yield stage
    del STAGES["toy"]


def test_the_loop_runs_a_stage_it_does_not_know(toy_stage, tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    results = train(load_config(None, {
        "stage": "toy", "model_name_or_path": str(tiny_model_dir), "dataset": "arith",
        "dataset_dir": str(tiny_data_dir), "output_dir": str(out), "cutoff_len": 64, "val_size": 8,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
        "logging_steps": 1, "lora_rank": 4, "disable_tqdm": True, "bf16": False,
        "save_strategy": "no"}))
    assert results["eval_half"] == results["eval_half_before"] == 0.5  # a mean over the normaliser
    assert "perplexity" not in results  # eval_metrics is the stage's: none here
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["eval_half"] for e in log if "eval_loss" in e] == [0.5, 0.5]


def test_sft_is_the_default_stage():
    assert load_config(None, {}).finetune.stage == "sft"
    assert get_stage("sft").head == "causal_lm" and get_stage("sft").packing
