"""`finetuning_type: bitfit` from a YAML config (bitfit_target): the run trains bias deltas only
and saves a BITFIT adapter that loads back to the same outputs. The tiny Llama has no biases, so
BitFit added zero ones: `tuneforge export` refuses to write a merged folder that would lose them."""

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

    with pytest.raises(ConfigError, match=r"the merged model has 8 parameter\(s\) its config does not declare "
                                          r"\(e\.g\. model\.layers\.0\.self_attn\.q_proj\.bias"):
        export_to(tiny_model_dir, out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
