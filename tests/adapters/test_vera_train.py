"""`finetuning_type: vera` from a YAML config (vera_rank, vera_d_initial): the run trains the
scaling vectors only, saves a peft VERA adapter (projections included) that peft loads to the same
outputs, and `tuneforge export` merges it into a folder transformers loads to the same outputs."""

from __future__ import annotations

from peft import PeftModel
from test_ln_tuning_train import export_to, logits, train_from_yaml
from transformers import AutoModelForCausalLM

from tuneforge.adapters import VeraConfig, list_adapters, load_adapter
from tuneforge.adapters.core import adapter_layers
from tuneforge.config import load_config
from tuneforge.workflows import chat_model


def test_vera_trains_from_yaml_peft_loads_it_and_it_exports(tiny_model_dir, tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    config = train_from_yaml(tiny_model_dir, tiny_data_dir, out, "finetuning_type: vera\nlora_target: q_proj,v_proj\n"
                             "vera_rank: 32\nvera_d_initial: 0.5\nlearning_rate: 5.0e-2\n")
    assert config["peft_type"] == "VERA" and config["r"] == 32 and config["d_initial"] == 0.5

    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert isinstance(list_adapters(ours)["default"], VeraConfig)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    got, plain = logits(ours), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert (got - plain).abs().max() > 1e-4, "the trained vectors change nothing"
    assert (got - logits(theirs)).abs().max().item() <= 1e-5

    merged = AutoModelForCausalLM.from_pretrained(export_to(tiny_model_dir, out, tmp_path / "merged"))
    assert (logits(merged) - got).abs().max().item() <= 1e-5


def test_vera_trains_from_yaml_on_a_4bit_base(tiny_model_dir, tiny_data_dir, tmp_path):
    """quantization_bit: 4 with finetuning_type: vera: VeRA layers over QuantLinear, the loss falls,
    and the adapter loads back onto a quantized base."""
    out = tmp_path / "run"
    config = train_from_yaml(tiny_model_dir, tiny_data_dir, out, "finetuning_type: vera\nlora_target: q_proj,v_proj\n"
                             "quantization_bit: 4\nvera_rank: 16\nlearning_rate: 5.0e-2\n")
    assert config["peft_type"] == "VERA"
    chat = chat_model(load_config(None, {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out),
                                         "quantization_bit": 4}))
    assert {type(m).__name__ for _, m in adapter_layers(chat.model)} == {"VeraQuantLinear"}
