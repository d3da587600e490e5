"""`finetuning_type: loha` / `lokr` from a YAML config (also on a 4-bit base): the run trains the
adapter only, its own keys reach adapter_config.json, peft loads the saved adapter to the same
outputs, `chat`'s loader attaches it again, and `tuneforge export` merges it."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tuneforge.adapters import LoHaConfig, LoKrConfig, list_adapters, load_adapter
from tuneforge.config import load_config
from tuneforge.workflows import export, train

RUNS = {
    "loha": ("LOHA", LoHaConfig, "rank_dropout: 0.1\nmodule_dropout: 0.05\n",
             {"r": 4, "alpha": 4, "rank_dropout": 0.1, "module_dropout": 0.05}),
    "lokr": ("LOKR", LoKrConfig, "lora_alpha: 8\ndecompose_both: true\ndecompose_factor: 4\nrank_dropout_scale: true\n",
             {"r": 4, "alpha": 8, "decompose_both": True, "decompose_factor": 4, "rank_dropout_scale": True}),
    "loha-4bit": ("LOHA", LoHaConfig, "quantization_bit: 4\n", {"r": 4}),  # trained on a frozen NF4 base
}  # fmt: skip


@pytest.mark.parametrize("method", list(RUNS))
def test_lycoris_trains_from_yaml_and_peft_loads_it(tiny_model_dir, tiny_data_dir, tmp_path, method):
    peft_type, config_class, keys, written = RUNS[method]
    method = method.split("-")[0]
    out = tmp_path / "run"
    cfg = tmp_path / f"{method}.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: {method}\nlora_rank: 4\nlora_target: all\n{keys}cutoff_len: 64\n"
        "per_device_train_batch_size: 4\nlearning_rate: 2.0e-2\nmax_steps: 10\nlogging_steps: 2\n"
        "save_steps: 100\ndisable_tqdm: true\nbf16: false\n"
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and {k: config[k] for k in written} == written
    assert "down_proj" in config["target_modules"] and "lm_head" not in config["target_modules"]

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert isinstance(list_adapters(ours)["default"], config_class)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        got, expected, plain = ours(ids).logits, theirs(ids).logits, base(ids).logits
    assert (got - plain).abs().max() > 1e-4, "the trained adapter changes nothing"
    assert (got - expected).abs().max().item() <= 1e-5
    if method == "loha":  # `tuneforge export` merges it: the exported model computes what the adapter did
        merged = tmp_path / "merged"
        export(load_config(None, {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out),
                                  "export_dir": str(merged), "export_dtype": "float32"}))
        with torch.no_grad():
            exported = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        assert (exported - got).abs().max().item() <= 1e-4
