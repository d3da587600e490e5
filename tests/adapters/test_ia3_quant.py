"""IA3 on a quantized base (QuantLinear, tuneforge.quant): the same outputs and gradients as IA3 on
the dequantized model (4-bit NF4 / FP4 and int8; output-scaling and feedforward layers, with and
without a bias), merging refused with one line and exact after dequantize_model, the saved adapter
loading onto the plain model, vectors kept when the base is quantized after adding them, and
`finetuning_type: ia3` with `quantization_bit: 4` training from YAML, serving on the 4-bit base
and exporting (dequantize, then merge)."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_testkit import logits, make_model, tokens
from test_ln_tuning_train import train_from_yaml
from transformers import AutoModelForCausalLM

from tuneforge import adapters as A
from tuneforge.adapters.core import adapter_layers
from tuneforge.adapters.ia3 import IA3Linear, IA3QuantLinear
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.models import load_model_and_tokenizer
from tuneforge.quant import QuantLinear, dequantize_model, quantize_model
from tuneforge.workflows import chat_model, export

# (model, quantize_model settings); Qwen2's q/v projections (IA3 output-scaled) carry biases
BASES = {
    "llama-nf4": ("llama", {"bits": 4, "quant_type": "nf4"}),
    "llama-int8": ("llama", {"bits": 8}),
    "qwen2-fp4": ("qwen2", {"bits": 4, "quant_type": "fp4", "double_quant": False}),
}


def _quantized(kind: str, settings: dict) -> torch.nn.Module:
    return quantize_model(make_model(kind), compute_dtype="float32", backend="native", **settings)


def _moved(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Default IA3 targets (peft's: feedforward down_proj, output-scaled attention projections)
    with vectors near one, as after some training."""
    A.add_adapter(model, A.IA3Config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("base", list(BASES))
def test_ia3_on_a_quantized_base_equals_the_dequantized_model(base):
    kind, settings = BASES[base]
    model = _quantized(kind, settings)
    ref = dequantize_model(copy.deepcopy(model))
    for m in (model, ref):
        _moved(m)
    layers = dict(adapter_layers(model))
    assert {type(m) for m in layers.values()} == {IA3QuantLinear}
    assert {type(m) for _, m in adapter_layers(ref)} == {IA3Linear}
    ff = [p for p, m in layers.items() if m.ia3_feedforward["default"]]
    assert ff and len(ff) < len(layers)  # both forms are covered
    if kind == "qwen2":
        assert layers["model.layers.0.self_attn.q_proj"].bias is not None

    ids = tokens()
    expected = logits(model, ids)
    assert (expected - logits(make_model(kind), ids)).abs().max() > 1e-3  # the vectors do something
    torch.testing.assert_close(expected, logits(ref, ids), rtol=1e-5, atol=1e-5)
    for m in (model, ref):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and ours and all("ia3_l" in n for n in ours)
    for n in ours:
        assert ours[n].abs().max() > 0, n
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-4, atol=1e-6, msg=n)
    model.eval()

    what = "4-bit nf4" if base == "llama-nf4" else "8-bit int8" if base == "llama-int8" else "4-bit fp4"
    with pytest.raises(ConfigError, match=f"^cannot merge into .*quantized \\({what}\\).*dequantize_model") as exc:
        A.merge_adapters(model)
    assert "\n" not in str(exc.value)
    torch.testing.assert_close(logits(model, ids), expected)  # nothing was half merged
    dequantize_model(model)
    A.merge_adapters(model)
    assert all(m.merged_adapters() == ["default"] for _, m in adapter_layers(model))
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_ia3_saved_on_a_4bit_base_loads_onto_the_plain_and_the_quantized_model(tmp_path):
    model = _moved(_quantized("llama", BASES["llama-nf4"][1]))
    ids = tokens()
    expected = logits(model, ids)
    A.save_adapter(model, tmp_path / "adapter")
    plain = A.load_adapter(dequantize_model(_quantized("llama", BASES["llama-nf4"][1])), tmp_path / "adapter")
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)
    again = A.load_adapter(_quantized("llama", BASES["llama-nf4"][1]), tmp_path / "adapter")
    assert {type(m) for _, m in adapter_layers(again)} == {IA3QuantLinear}
    assert torch.equal(logits(again, ids), expected)  # same codes, same vectors: bit for bit


def test_quantizing_a_model_that_carries_ia3_keeps_the_vectors():
    model = _moved(make_model("llama"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "ia3_l" in n}
    quantize_model(model, compute_dtype="float32", backend="native")
    after = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in after.values())
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, IA3QuantLinear) and isinstance(layer, QuantLinear) and layer.ia3_feedforward["default"]
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(dequantize_model(copy.deepcopy(model)), ids),
                               rtol=1e-5, atol=1e-5)


def test_ia3_trains_from_yaml_on_a_4bit_base_serves_and_exports(tiny_model_dir, tiny_data_dir, tmp_path):
    """quantization_bit: 4 with finetuning_type: ia3: IA3 layers over QuantLinear, the loss falls,
    the adapter loads back onto the 4-bit base, and `tuneforge export` (dequantize, merge) writes a
    model computing what the adapter on the 4-bit base computes."""
    out = tmp_path / "run"
    config = train_from_yaml(tiny_model_dir, tiny_data_dir, out, "finetuning_type: ia3\nlora_target: all\n"
                             "quantization_bit: 4\nlearning_rate: 5.0e-2\n")
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    quant = {"model_name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(out), "quantization_bit": 4}
    served = chat_model(load_config(None, quant)).model
    assert {type(m).__name__ for _, m in adapter_layers(served)} == {"IA3QuantLinear"}
    quant["compute_dtype"] = "float32"  # the fp32 reference the export is held to
    model, _ = load_model_and_tokenizer(load_config(None, quant).model, dtype=torch.float32)
    model = A.load_adapter(model, out).eval()
    assert {type(m) for _, m in adapter_layers(model)} == {IA3QuantLinear}
    ids = tokens()
    with torch.no_grad():
        got = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert (got - plain).abs().max() > 1e-3, "the trained vectors change nothing"

    merged_dir = export(load_config(None, {**quant, "export_dir": str(tmp_path / "merged"), "export_dtype": "float32"}))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("ia3" in n or "qweight" in n for n in merged.state_dict())
    with torch.no_grad():
        assert (merged(ids).logits - got).abs().max().item() <= 1e-4


def test_ia3_beside_lora_on_a_4bit_base_routes_per_row():
    """What `tuneforge api` does with an IA3 and a LoRA adapter on one quantized model: each row
    of a batch gets its own adapter, as that adapter alone computes it."""
    model = _quantized("llama", BASES["llama-nf4"][1])
    A.add_adapter(model, A.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora")
    _moved(model)  # "default": k_proj, v_proj, down_proj (feedforward)
    ids = tokens()
    alone = {}
    for name in ("default", "lora"):
        A.set_active_adapters(model, [name])
        alone[name] = logits(model, ids)
    assert (alone["default"] - alone["lora"]).abs().max() > 1e-3
    with torch.no_grad(), A.route_adapters(model, ["default", "lora"]):
        routed = model(input_ids=ids).logits
    torch.testing.assert_close(routed[0], alone["default"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], alone["lora"][1], atol=1e-5, rtol=0)
