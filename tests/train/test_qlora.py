"""QLoRA from YAML on a tiny model: the base trains frozen in 4 bits and the adapter is an
ordinary peft-format LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.workflows import train

TOL = 1e-5


def _yaml(tmp_path, model_dir, data_dir, extra: str) -> str:
    path = tmp_path / "qlora.yaml"
    path.write_text(
        f"model_name_or_path: {model_dir}\ndataset: arith\ndataset_dir: {data_dir}\n"
        f"output_dir: {tmp_path / 'out'}\nfinetuning_type: lora\nlora_rank: 4\nlora_target: all\n"
        "max_steps: 6\nlearning_rate: 1.0e-2\ncutoff_len: 64\nper_device_train_batch_size: 4\n"
        "gradient_accumulation_steps: 1\nbf16: false\ndisable_tqdm: true\nlogging_steps: 1\n"
        "eval_on_start: false\n" + extra
    )
    return str(path)


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 520, 33, 4077, 17, 902, 3, 88, 250, 7]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("extra", [
    "quantization_bit: 4\ncompute_dtype: float32\n",
    "quantization_bit: 4\nquantization_type: fp4\ndouble_quantization: false\ncompute_dtype: float32\n"
    "quantization_backend: native\n",
    "quantization_bit: 8\ncompute_dtype: float32\nuse_dora: true\n",
    "quantization_bit: 4\ncompute_dtype: float32\ngradient_checkpointing: true\n",
], ids=["nf4", "fp4-native", "int8-dora", "nf4-checkpointing"])
def test_yaml_qlora_trains_and_saves_a_plain_adapter(tiny_model_dir, tiny_data_dir, tmp_path, extra):
    from peft import PeftModel

    from tuneforge.adapters import load_adapter
    from tuneforge.quant import QuantLinear, dequantize_model, quantize_model

    cfg = load_config(_yaml(tmp_path, tiny_model_dir, tiny_data_dir, extra))
    results = train(cfg)
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert results["train_loss"] > 0
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # no quantized base tensor in the adapter
    record = json.loads((out / "base_quantization.json").read_text())  # which base it was trained on
    assert record["bits"] == cfg.model.quantization_bit and record["quant_type"] == cfg.model.quantization_type

    # on the same quantized base, tuneforge's adapter equals peft's on the dequantized weights
    m = cfg.model
    quantized = quantize_model(_base(tiny_model_dir), bits=m.quantization_bit, quant_type=m.quantization_type,
                               double_quant=m.double_quantization, compute_dtype="float32")
    assert any(isinstance(x, QuantLinear) for x in quantized.modules())
    reference = PeftModel.from_pretrained(dequantize_model(_base_copy(quantized)), str(out)).eval()
    ours = load_adapter(quantized, out)
    assert (_logits(ours) - _logits(reference)).abs().max().item() <= TOL
    # and it loads on the unquantized base as an ordinary adapter
    plain = load_adapter(_base(tiny_model_dir), out)
    assert (_logits(plain) - _logits(ours)).abs().max().item() < 0.5


def _base_copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("extra, message", [
    ("quantization_bit: 4\nfinetuning_type: full\n", "quantization_bit.*needs finetuning_type: lora"),
    ("quantization_bit: 3\n", "quantization_bit"),
    ("quantization_bit: 4\npissa_init: true\n", "pissa_init.*loftq_iter"),
    ("quantization_bit: 4\nquantization_type: int4\n", "quantization_type"),
    ("quantization_bit: 4\nquantization_backend: gptq\n", "quantization_backend"),
    ("loftq_iter: 2\n", "loftq_iter.*quantization_bit"),
])
def test_bad_quantization_keys(tiny_model_dir, tiny_data_dir, tmp_path, extra, message):
    text = _yaml(tmp_path, tiny_model_dir, tiny_data_dir, "")
    body = open(text).read().replace("finetuning_type: lora\n", "") if "finetuning_type" in extra else open(text).read()
    open(text, "w").write(body + extra)
    with pytest.raises(ConfigError, match=message):
        train(load_config(text))
    assert not (tmp_path / "out").exists()


def test_an_adapter_from_a_4bit_base_says_so_on_an_unquantized_one(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                  caplog):
    from tuneforge.models import attach_adapters, load_model_and_tokenizer

    train(load_config(_yaml(tmp_path, tiny_model_dir, tiny_data_dir, "quantization_bit: 4\ncompute_dtype: float32\n")))
    out = tmp_path / "out"
    fp = load_config(None, {"model_name_or_path": str(tiny_model_dir)})
    with caplog.at_level("WARNING", logger="tuneforge"):
        attach_adapters(load_model_and_tokenizer(fp.model)[0], [str(out)], trainable=False)
    assert "trained on a 4-bit nf4 base, but this model is not quantized" in caplog.text
    caplog.clear()
    q = load_config(None, {"model_name_or_path": str(tiny_model_dir), "quantization_bit": 4})
    with caplog.at_level("WARNING", logger="tuneforge"):
        attach_adapters(load_model_and_tokenizer(q.model)[0], [str(out)], trainable=False)
    assert "trained on" not in caplog.text
