"""export_quantization_bit writes transformers' bitsandbytes serialisation: from_pretrained loads
the export with every quantized weight it holds (none missing, none random), equal to tuneforge's own
quantization of the same merged weights; the error printed is the one measured on the files."""

from __future__ import annotations

import logging
import re

import bitsandbytes as bnb  # a test dependency (pyproject's test extra)
import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.config import load_config
from tuneforge.quant import quantize_model
from tuneforge.workflows import export

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7]])


def _export(base, out, bits, **extra):
    cfg = load_config(None, {"model_name_or_path": str(base), "export_dir": str(out), "export_dtype": "float32",
                             "export_quantization_bit": bits, **extra})
    return export(cfg)


def _bnb_weight(layer) -> torch.Tensor:
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).float()


@pytest.mark.parametrize("bits", [4, 8])
def test_from_pretrained_loads_the_quantized_export(tiny_model_dir, tmp_path, caplog, bits):
    out = tmp_path / "q"
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        _export(tiny_model_dir, out, bits)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert loaded.config.quantization_config.quant_method == "bitsandbytes"
    assert (out / "tokenizer.json").is_file() and not (out / "tuneforge_quantization.json").exists()
    assert not (out / "Modelfile").exists() and "no Ollama Modelfile" in caplog.text

    fp = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    layers = {p: m for p, m in loaded.named_modules() if isinstance(m, kind)}
    assert len(layers) == 2 * 7  # every projection of both layers is quantized; the head is not
    diff = ref = worst = 0.0
    if bits == 4:  # tuneforge's own NF4 (blocks of 64, 8-bit scales) gives the same weights (but where the
        # two round a double-quantized scale differently: a few blocks, far below the quantization error)
        ours = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
                              bits=4, compute_dtype="float32", backend="native")
    for path, layer in layers.items():
        w, w0 = _bnb_weight(layer), fp.get_submodule(path).weight
        if bits == 4:
            mine = ours.get_submodule(path).dequantize(torch.float32)
            assert (w != mine).float().mean() < 0.02
            assert (w - mine).abs().max() <= 0.05 * (w0 - mine).abs().max()
        else:  # LLM.int8: one scale per row
            step = w0.abs().amax(dim=1, keepdim=True) / 127
            assert ((w - w0).abs() <= 0.55 * step).all()  # half a step, plus bitsandbytes' float16 rounding
        err = w - w0
        diff, ref, worst = diff + err.square().sum(), ref + w0.square().sum(), max(worst, err.abs().max())
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantized the merged weights")]
    assert len(line) == 1 and "14 layers" in line[0]
    rel, max_abs = (float(x) for x in re.search(r"= (\S+), max abs error (\S+)$", line[0]).groups())
    assert rel == pytest.approx(float((diff / ref).sqrt()), rel=1e-3)
    assert max_abs == pytest.approx(float(worst), rel=1e-3)
    with torch.no_grad():
        got, want = loaded(IDS).logits.float(), fp(IDS).logits
        if bits == 4:  # tuneforge's dequantised model computes the same, far closer than either to fp
            mine = ours(IDS).logits
            assert (got - mine).norm() < 0.1 * (mine - want).norm()
    assert (got - want).norm() / want.norm() < (0.3 if bits == 4 else 0.05)


def test_gptq_export_is_refused_in_one_line():
    """LLaMA-Factory's export_quantization_dataset (GPTQ through gptqmodel) is named, not half-done."""
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^config key 'export_quantization_dataset': LLaMA-Factory's GPTQ export"):
        load_config(None, {"export_quantization_bit": 4, "export_quantization_dataset": "c4_demo"})


def test_without_bitsandbytes_the_export_is_refused_before_the_work(tiny_model_dir, tmp_path, monkeypatch):
    import sys

    from tuneforge.errors import ConfigError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    with pytest.raises(ConfigError, match=r"^config key 'export_quantization_bit' writes transformers' bitsandbytes "
                                          r"format, which needs the bitsandbytes package: pip install bitsandbytes"):
        _export(tiny_model_dir, tmp_path / "q", 4)
    assert not (tmp_path / "q").exists()
