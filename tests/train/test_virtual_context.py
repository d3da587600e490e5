"""Training with a virtual-token method (prompt / prefix tuning, P-tuning, ...): its
num_virtual_tokens positions come before every row, so an example of L tokens ends at position
N + L. Rows past the model's context are refused before training, with the cutoff_len (and the
num_virtual_tokens) that fit; they are not cut, so cutoff_len keeps meaning what the config says.

The model is a tiny GPT-2 with a 64-token context: its positions are learned embeddings, so
without the check such a row fails in the first step (an index past the table); rows that are
longer than the context by themselves are refused for such a model too."""

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


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning", "ptuning_v2", "mam", "unipelt"])
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


def test_check_virtual_room_counts_and_fixes():
    """The check itself on a model in memory: which examples count, and the fix it offers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuneforge.adapters import LoraConfig, PromptTuningConfig, add_adapter
    from tuneforge.infer.generation import check_virtual_room

    def model(adapter):
        built = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2))
        add_adapter(built, adapter)
        return built

    def rows(*lengths):
        return [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]

    prompt = model(PromptTuningConfig(num_virtual_tokens=20))
    check_virtual_room(prompt, None, {"train": rows(44, 10), "eval": None}, 64)  # 20 + 44 = 64 fits
    with pytest.raises(ConfigError, match=r"^1 of the 3 eval examples run past this model's context of 64 tokens: "
                       r"adapter 'default' puts num_virtual_tokens=20 virtual tokens before each, and the longest "
                       r"example is 45 tokens \(cutoff_len=50\); lower cutoff_len to 44$"):
        check_virtual_room(prompt, None, {"train": rows(44), "eval": rows(45, 3, 44)}, 50)
    pairs = [{"chosen_ids": [1] * 30, "rejected_ids": [1] * 50}]  # rm: the longer sequence counts
    with pytest.raises(ConfigError, match=r"longest example is 50 tokens; lower cutoff_len to 44 or "
                                          r"num_virtual_tokens to 14$"):
        check_virtual_room(prompt, None, {"train": pairs}, None, tunable=True)
    crowded = model(PromptTuningConfig(num_virtual_tokens=63))  # no cutoff_len leaves room for a reply
    with pytest.raises(ConfigError, match=r"lower num_virtual_tokens to 61$"):
        check_virtual_room(crowded, None, {"train": rows(3)}, 64, "finetuning_type: prompt", tunable=True)
    with pytest.raises(ConfigError, match=r"; use an adapter with fewer virtual tokens$"):
        check_virtual_room(crowded, None, {"eval": rows(3)}, 64)
    lora = model(LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    check_virtual_room(lora, None, {"train": rows(500)}, 512)  # no virtual tokens: for training only
    check_virtual_room(lora, None, {"train": rows(64, 3)}, 64, whole_rows=True)  # training: the rows must fit
    with pytest.raises(ConfigError, match=r"^all 1 train examples run past this model's context of 64 tokens \(its "
                       r"learned position embeddings end there\): the longest example is 500 tokens "
                       r"\(cutoff_len=512\); lower cutoff_len to 64$"):
        check_virtual_room(lora, None, {"train": rows(500)}, 512, whole_rows=True)  # else an IndexError
    from transformers import LlamaConfig, LlamaForCausalLM

    rotary = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=CONTEXT))
    check_virtual_room(rotary, None, {"train": rows(500)}, 512, whole_rows=True)  # rotary positions run past (as LLaMA-Factory)


def test_rows_past_learned_positions_are_refused_without_virtual_tokens(gpt2_dir, tmp_path):
    """LoRA on GPT-2: a row longer than its 64 learned positions would fail in the first step with an
    IndexError; it is refused before training, naming the cutoff_len that fits."""
    from tests.conftest import write_dataset

    records = [{"instruction": "Count: " + "one " * 60, "input": "", "output": "Done."}] * 4
    data = write_dataset(tmp_path / "data", "long", records)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^all 4 train examples run past this model's context of 64 tokens \(its "
                       r"learned position embeddings end there\): the longest example is \d+ tokens "
                       r"\(cutoff_len=128\); lower cutoff_len to 64$"):
        train(load_config(None, {"model_name_or_path": str(gpt2_dir), "dataset": "long", "dataset_dir": str(data),
                                 "output_dir": str(out), "cutoff_len": 128, "finetuning_type": "lora",
                                 "lora_target": "c_attn", "max_steps": 1, "bf16": False}))
    assert not out.exists()
