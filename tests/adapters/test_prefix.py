"""Prefix tuning and P-tuning v2 against peft's PrefixTuningConfig (tiny Llama with grouped-query
attention, Qwen2, GPT-2): outputs, gradients, generation, files both ways, no merge
(test_prompt.assert_matches_peft); the prefix_projection MLP folded into the saved prefix."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from test_matrix import build
from test_prompt import KINDS, assert_matches_peft

from tuneforge.adapters import PrefixTuningConfig, add_adapter, load_adapter, save_adapter
from tuneforge.adapters.virtual_tokens import HOLDER
from tuneforge.errors import ConfigError

WHY = "prefix tuning adds key/value prefixes, which no weight can hold"


@pytest.mark.parametrize("projection", [True, False], ids=["projection", "ptuning_v2"])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_tuning_matches_peft(tmp_path, kind, projection):
    extra = {"encoder_hidden_size": 24} if projection else {}
    assert_matches_peft(
        tmp_path, kind, PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection, **extra),
        PeftPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, **extra),
        WHY,
    )


def test_projection_is_folded_when_saved(tmp_path):
    """The file holds the MLP's output; loaded back, the plain prefix gives the same logits."""
    model = add_adapter(build("llama"), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)).eval()
    enc = getattr(model, HOLDER).encoders["default"]
    with torch.no_grad():
        enc.transform[2].weight.normal_(std=0.2)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tmp_path)
    back = load_adapter(build("llama"), tmp_path, is_trainable=True)
    loaded = getattr(back, HOLDER).encoders["default"]
    # llama tiny: 2 layers, 2 key/value heads of 16 -> token_dim 32; 2 * 2 * 32 = 128 per virtual token
    assert [n for n, _ in loaded.named_parameters()] == ["embedding.weight"]
    assert loaded.embedding.weight.shape == (3, 128) and loaded.embedding.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, want)


def test_prefix_config_errors():
    with pytest.raises(ConfigError, match="prefix_projection must be true or false"):
        PrefixTuningConfig(prefix_projection="yes")
    with pytest.raises(ConfigError, match="encoder_hidden_size must be a positive integer"):
        PrefixTuningConfig(encoder_hidden_size=0)



def test_prefix_trains_with_gradient_checkpointing_paused(caplog):
    """transformers' checkpointed layers drop the cache, and with it the prefix: checkpointing is
    paused during the forward (said once), and the gradients are those without it."""
    grads = []
    for checkpointing in (False, True):
        model = add_adapter(build("llama"), PrefixTuningConfig(num_virtual_tokens=3))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(getattr(model, HOLDER).encoders["default"].embedding.weight.grad)
    assert "gradient_checkpointing is off while a prefix-tuning adapter trains" in caplog.text
    assert model.model.layers[0].gradient_checkpointing  # on again after the forward
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("projection", [True, False])
def test_zero_init_starts_at_zero_keys_and_values(projection):
    model = add_adapter(build("gpt2"), PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=projection,
                                                          init_weights="zero"))
    prefix = getattr(model, HOLDER).encoders["default"].saved()
    assert prefix.shape == (3, 2 * 2 * 64) and not prefix.any()
    with pytest.raises(ConfigError, match="init_weights must be empty"):
        PrefixTuningConfig(init_weights="normal")


def test_prefix_on_a_quantized_base():
    """A 4-bit base takes a prefix (the Python API; nothing of the base changes): the same logits
    as the dequantized weights with the same prefix, and gradients reach the prefix."""
    from tuneforge import dequantize_model, quantize_model

    base = quantize_model(build("llama"), 4, compute_dtype=torch.float32)
    model = add_adapter(base, PrefixTuningConfig(num_virtual_tokens=3)).eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        plain = dequantize_model(model)
        torch.testing.assert_close(plain(input_ids=ids).logits, got, atol=1e-4, rtol=1e-4)
    plain.train()
    plain(input_ids=ids, labels=ids).loss.backward()
    assert getattr(plain, HOLDER).encoders["default"].embedding.weight.grad.abs().sum() > 0


def test_yaml_trains_a_prefix_on_a_4bit_base(tiny_model_dir, shared_data_dir, tmp_path):
    """finetuning_type: ptuning_v2 with quantization_bit: 4 trains from a config (the base stays
    frozen in 4 bits) and saves a peft prefix file."""
    import json

    from tuneforge.config import load_config
    from tuneforge.workflows import train

    out = tmp_path / "out"
    result = train(load_config(None, {
        "model_name_or_path": str(tiny_model_dir), "dataset": "identity", "dataset_dir": str(shared_data_dir),
        "cutoff_len": 32, "max_samples": 8, "output_dir": str(out), "finetuning_type": "ptuning_v2",
        "num_virtual_tokens": 2, "quantization_bit": 4, "max_steps": 2, "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "report_to": "none",
    }))
    assert result["global_step"] == 2 and result["train_loss"] == result["train_loss"]  # finite
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and not config["prefix_projection"]
    assert (out / "base_quantization.json").is_file()
