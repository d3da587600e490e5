"""`finetuning_type: mam` from a YAML config (fp32 and 4-bit base): the run trains the prefix and
the adapters only, the loss falls, the adapter is saved with peft_type MAM, and loading it again
gives the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.adapters import MamConfig, list_adapters, load_adapter
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.workflows import train


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32-base", "4bit-base"])
def test_mam_trains_from_yaml_and_loads_back(tiny_model_dir, tiny_data_dir, tmp_path, quantized):
    out = tmp_path / "run"
    cfg = tmp_path / "mam.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: arith\ndataset_dir: {tiny_data_dir}\n"
        f"output_dir: {out}\nfinetuning_type: mam\nnum_virtual_tokens: 4\nprefix_projection: false\n"
        "adapter_size: 16\nadapter_act: gelu\nadapter_scaling: 4\ncutoff_len: 64\nper_device_train_batch_size: 4\n"
        "learning_rate: 1.0e-2\nmax_steps: 12\nlogging_steps: 2\nsave_steps: 100\ndisable_tqdm: true\nbf16: false\n"
        + ("quantization_bit: 4\n" if quantized else "")
    )
    train(load_config(str(cfg)))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MAM" and config["target_modules"] == ["mlp"]
    assert (config["num_virtual_tokens"], config["adapter_size"], config["adapter_act"],
            config["adapter_scaling"]) == (4, 16, "gelu", 4.0)

    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert isinstance(list_adapters(ours)["default"], MamConfig)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-4, "the trained adapter changes nothing"


def test_mam_yaml_refusals():
    with pytest.raises(ConfigError, match="config key 'adapter_type' needs finetuning_type: bottleneck"):
        load_config(None, {"finetuning_type": "mam", "adapter_type": "parallel", "dataset": "x", "output_dir": "o"})
    with pytest.raises(ConfigError, match="config key 'num_virtual_tokens' needs finetuning_type: .*mam"):
        load_config(None, {"finetuning_type": "lora", "num_virtual_tokens": 8, "dataset": "x", "output_dir": "o"})
