"""`finetuning_type: ia3` from a YAML config: the run trains IA3 vectors only, saves a peft IA3
adapter that peft loads to the same outputs, and `chat`'s loader attaches it again."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tuneforge.adapters import IA3Config, list_adapters, load_adapter
from tuneforge.config import load_config
from tuneforge.workflows import train


def test_ia3_trains_from_yaml_and_peft_loads_it(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "ia3.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: ia3\nlora_target: all\ncutoff_len: 64\n"
        "per_device_train_batch_size: 4\nlearning_rate: 5.0e-2\nmax_steps: 12\nlogging_steps: 2\n"
        "save_steps: 100\ndisable_tqdm: true\nbf16: false\n"
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    assert "down_proj" in config["target_modules"] and "lm_head" not in config["target_modules"]

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert isinstance(list_adapters(ours)["default"], IA3Config)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        got, expected, plain = ours(ids).logits, theirs(ids).logits, base(ids).logits
    assert (got - plain).abs().max() > 1e-4, "the trained vectors change nothing"
    assert (got - expected).abs().max().item() <= 1e-5
