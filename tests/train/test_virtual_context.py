"""Training with a virtual-token method (prompt / prefix tuning, P-tuning, ...): its
num_virtual_tokens positions come before every row, so an example of L tokens ends at position
N + L. Rows past the model's context are refused before training, with the cutoff_len (and the
num_virtual_tokens) that fit; they are not cut, so cutoff_len keeps meaning what the config says.

The model is a tiny GPT-2 with a 64-token context: its positions are learned embeddings, so
without the check such a row fails in the first step (an index past the table)."""

from __future__ import annotations

import re

import pytest
import torch

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.workflows import train

CONTEXT = 64


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, default_model_path):
    """A random 2-layer GPT-2 (context 64) with the default model's tokenizer and template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(model_dir, data_dir, out, **overrides):
    values = {"model_name_or_path": str(model_dir), "dataset": "arith", "dataset_dir": str(data_dir),
              "output_dir": str(out), "cutoff_len": CONTEXT, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "max_steps": 2, "logging_steps": 1, "save_steps": 100,
              "val_size": 4, "disable_tqdm": True, "bf16": False, "num_virtual_tokens": 24, **overrides}
    return load_config(None, values)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_rows_past_the_context_are_refused_before_training(method, gpt2_dir, tiny_data_dir, tmp_path):
    """~42-token examples fit the 64-token context alone, not after 24 virtual tokens."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        train(_cfg(gpt2_dir, tiny_data_dir, out, finetuning_type=method))
    message = str(info.value)
    found = re.fullmatch(
        rf"(all|\d+ of the) \d+ train examples run past this model's context of 64 tokens: finetuning_type: "
        rf"{method} puts num_virtual_tokens=24 virtual tokens before each, and the longest example is (\d+) "
        r"tokens \(cutoff_len=64\); lower cutoff_len to 40 or num_virtual_tokens to (\d+)", message)
    assert found, message
    assert int(found.group(3)) == CONTEXT - int(found.group(2))
    assert not out.exists()  # refused before output_dir is touched


def test_the_settings_the_message_names_train(gpt2_dir, tiny_data_dir, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(_cfg(gpt2_dir, tiny_data_dir, tmp_path / "refused", finetuning_type="prefix"))
    fitting = int(re.search(r"num_virtual_tokens to (\d+)$", str(info.value)).group(1))
    for name, fix in {"cut": {"cutoff_len": 40}, "fewer": {"num_virtual_tokens": fitting}}.items():
        results = train(_cfg(gpt2_dir, tiny_data_dir, tmp_path / name, finetuning_type="prefix", **fix))
        assert results["train_loss"] > 0 and (tmp_path / name / "adapter_model.safetensors").exists()
