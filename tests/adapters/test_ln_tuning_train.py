"""`finetuning_type: ln_tuning` from a YAML config: the run trains the norm copies only, saves a peft
LN_TUNING adapter that peft loads to the same outputs, and `tuneforge export` merges it into a
model folder that transformers loads to the same outputs. `train_from_yaml` / `logits` serve the
VeRA and BitFit files too."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tuneforge.adapters import LNTuningConfig, list_adapters, load_adapter
from tuneforge.config import load_config
from tuneforge.workflows import export, train

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def train_from_yaml(model_dir, data_dir, out, keys: str) -> dict:
    """Train on the tiny model with `keys` (YAML lines) added; asserts the loss fell; returns the
    written adapter_config.json."""
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(
        f"model_name_or_path: {model_dir}\ndataset: arith\ndataset_dir: {data_dir}\noutput_dir: {out}\n"
        "cutoff_len: 64\nper_device_train_batch_size: 4\nmax_steps: 12\nlogging_steps: 2\nsave_steps: 100\n"
        f"disable_tqdm: true\nbf16: false\n{keys}"
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0], losses
    return json.loads((out / "adapter_config.json").read_text())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def export_to(model_dir, adapter, folder):
    return export(load_config(None, {"model_name_or_path": str(model_dir), "adapter_name_or_path": str(adapter),
                                     "export_dir": str(folder), "export_dtype": "float32"}))


def test_ln_tuning_trains_from_yaml_peft_loads_it_and_it_exports(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    config = train_from_yaml(tiny_model_dir, tiny_data_dir, out,
                             "finetuning_type: ln_tuning\nlora_target: all\nlearning_rate: 5.0e-2\n")
    assert config["peft_type"] == "LN_TUNING"
    assert config["target_modules"] == ["input_layernorm", "post_attention_layernorm", "norm"]

    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert isinstance(list_adapters(ours)["default"], LNTuningConfig)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    got, plain = logits(ours), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert (got - plain).abs().max() > 1e-4, "the trained norms change nothing"
    assert (got - logits(theirs)).abs().max().item() <= 1e-5

    merged = AutoModelForCausalLM.from_pretrained(export_to(tiny_model_dir, out, tmp_path / "merged"))
    assert (logits(merged) - got).abs().max().item() <= 1e-5
