"""`finetuning_type: bitfit` from a YAML config (bitfit_target): the run trains bias deltas only
and saves a BITFIT adapter that loads back to the same outputs. The tiny Llama has no biases, so
BitFit added zero ones: `tuneforge export` declares them through Llama's own config switches
(attention_bias, mlp_bias), and refuses a merged folder that would lose biases no switch declares."""

from __future__ import annotations

import pytest
from test_ln_tuning_train import export_to, logits, train_from_yaml
from transformers import AutoModelForCausalLM

from tuneforge.adapters import BitFitConfig, list_adapters, load_adapter
from tuneforge.adapters.core import adapter_layers
from tuneforge.errors import ConfigError


def test_bitfit_trains_from_yaml_and_export_refuses_added_biases(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    config = train_from_yaml(tiny_model_dir, tiny_data_dir, out,
                             "finetuning_type: bitfit\nbitfit_target: attention\nlearning_rate: 5.0e-2\n")
    assert config["peft_type"] == "BITFIT" and config["target_modules"] == "attention"

    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert isinstance(list_adapters(ours)["default"], BitFitConfig)
    assert {p.rsplit(".", 1)[-1] for p, _ in adapter_layers(ours)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    got, plain = logits(ours), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert (got - plain).abs().max() > 1e-4, "the trained biases change nothing"

    export_to(tiny_model_dir, out, tmp_path / "merged")  # attention_bias: true declares q/k/v/o's biases
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.attention_bias is True and merged.config.mlp_bias is False
    assert (logits(merged) - got).abs().max() < 1e-5


def test_biases_no_config_switch_declares_are_refused(tiny_model_dir):
    """Biases on only some MLP layers of a model whose config has no switch for them alone."""
    import torch

    from tuneforge.export.merge import _check_declared, declare_biases

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = model.model.layers[0].self_attn.q_proj
    layer.bias = torch.nn.Parameter(torch.ones(layer.out_features))
    model.lm_head.bias = torch.nn.Parameter(torch.ones(model.lm_head.out_features))  # no flag covers it
    assert declare_biases(model) == [] and model.config.attention_bias is False
    with pytest.raises(ConfigError, match=r"the merged model has 2 parameter\(s\) its config does not declare"):
        _check_declared(model)
