"""LLaMA-Factory's keys for gradient checkpointing, pure bf16, added special tokens and
do_predict inside `tuneforge train`: each takes effect (the tests fail if it were ignored) and a
contradiction with tuneforge's own keys is one ConfigError line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.config_lf_keys import gradient_checkpointing
from tuneforge.errors import ConfigError
from tuneforge.workflows import train


def tiny_cfg(model_dir, data_dir, out, **overrides):
    values = {
        "model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
        "output_dir": str(out), "cutoff_len": 64, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "learning_rate": 5e-3, "max_steps": 1, "val_size": 0,
        "logging_steps": 1, "save_steps": 100, "lora_rank": 4, "disable_tqdm": True,
        "eval_on_start": False, "bf16": False,
    }
    values.update(overrides)
    return load_config(None, values)


# --- gradient checkpointing -------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ({}, None),
    ({"disable_gradient_checkpointing": True}, None),
    ({"disable_gradient_checkpointing": False}, {"use_reentrant": True}),  # LLaMA-Factory's defaults
    ({"gradient_checkpointing": True}, {"use_reentrant": True}),
    ({"gradient_checkpointing": True, "use_reentrant_gc": False}, {"use_reentrant": False}),
    ({"disable_gradient_checkpointing": False, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
     {"use_reentrant": False}),
    ({"gradient_checkpointing": True, "use_reentrant_gc": False,
      "gradient_checkpointing_kwargs": {"use_reentrant": False, "determinism_check": "none"}},
     {"use_reentrant": False, "determinism_check": "none"}),
])
def test_checkpointing_keys_combine(values, expected):
    assert gradient_checkpointing(load_config(None, values)) == expected


@pytest.mark.parametrize("values, message", [
    ({"gradient_checkpointing": True, "disable_gradient_checkpointing": True}, "contradict each other"),
    ({"gradient_checkpointing": False, "disable_gradient_checkpointing": False}, "contradict each other"),
    ({"gradient_checkpointing": True, "use_reentrant_gc": True,
      "gradient_checkpointing_kwargs": {"use_reentrant": False}}, "'use_reentrant_gc: true' and"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"reentrant": False}},
     "'gradient_checkpointing_kwargs' has 'reentrant'"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": "no"}},
     "use_reentrant must be true or false"),
    ({"use_reentrant_gc": False}, "config key 'use_reentrant_gc' sets up gradient checkpointing, which is off"),
    ({"disable_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
     "config key 'gradient_checkpointing_kwargs' sets up gradient checkpointing"),
    ({"gradient_checkpointing_kwargs": "use_reentrant=False"}, "expects a mapping"),
])
def test_checkpointing_contradictions_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, values)
    assert "\n" not in str(info.value)


def test_checkpointing_setting_reaches_torch_and_gradients_are_unchanged(
        tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """One step of plain SGD-like AdamW (adam_epsilon 1: the update is ~ the gradient) with each
    checkpoint variant: torch's checkpoint is called with use_reentrant as configured, and the
    adapter (the gradient) equals the one trained without checkpointing."""
    import transformers.modeling_utils as modeling_utils

    real, seen = modeling_utils.checkpoint, []

    def recording(function, *args, **kwargs):
        seen.append(kwargs.get("use_reentrant"))
        return real(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", recording)
    common = dict(learning_rate=1.0, adam_epsilon=1.0, lora_target="all")
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / "plain", **common))
    assert seen == []
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for name, keys, reentrant in [
            ("lf", {"disable_gradient_checkpointing": False}, True),
            ("kwargs", {"gradient_checkpointing": True,
                        "gradient_checkpointing_kwargs": {"use_reentrant": False}}, False)]:
        seen.clear()
        train(tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path / name, **common, **keys))
        assert seen and set(seen) == {reentrant}, name
        trained = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert trained.keys() == plain.keys()
        for key in plain:
            torch.testing.assert_close(trained[key], plain[key], atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
        assert any(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)


# --- pure_bf16 ----------------------------------------------------------------------------------

@pytest.fixture
def run_spy(monkeypatch):
    """Records, as each training run starts, the dtypes of the model's parameters (trainable and
    frozen) and the accelerator's mixed precision."""
    from tuneforge.train import loop

    real, seen = loop.TrainingRun.run, {}

    def run(self):
        params = list(self.model.parameters())
        seen.update(trainable={p.dtype for p in params if p.requires_grad},
                    frozen={p.dtype for p in params if not p.requires_grad},
                    precision=self.acc.mixed_precision)
        return real(self)

    monkeypatch.setattr(loop.TrainingRun, "run", run)
    return seen


def test_pure_bf16_trains_bf16_weights_without_autocast(tiny_model_dir, tiny_data_dir, tmp_path, run_spy):
    out = tmp_path / "lora"
    results = train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, pure_bf16=True, bf16=None, val_size=8,
                             max_steps=12, eval_on_start=True))
    assert run_spy == {"trainable": {torch.bfloat16}, "frozen": {torch.bfloat16}, "precision": "no"}
    assert results["eval_loss"] < results["eval_loss_before"]
    assert torch.isfinite(torch.tensor(results["train_loss"]))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    for key, tensor in adapter.items():  # peft's files hold fp32; the values are the bf16 weights
        torch.testing.assert_close(tensor, tensor.to(torch.bfloat16).float(), atol=0, rtol=0, msg=key)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)


def test_pure_bf16_full_finetuning_saves_bf16_weights(tiny_model_dir, tiny_data_dir, tmp_path, run_spy):
    out = tmp_path / "full"
    train(tiny_cfg(tiny_model_dir, tiny_data_dir, out, pure_bf16=True, bf16=None, finetuning_type="full",
                   learning_rate=1e-4))
    assert run_spy["trainable"] == {torch.bfloat16} and run_spy["precision"] == "no"
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


@pytest.mark.parametrize("values, message", [
    ({"pure_bf16": True, "fp16": True}, "config keys 'pure_bf16' and 'fp16' are both true"),
    ({"pure_bf16": True, "bf16": False}, "config key 'pure_bf16' is true but bf16 is false"),
])
def test_pure_bf16_contradictions(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)
    load_config(None, {"pure_bf16": True, "bf16": True})  # both ask for bf16: fine
