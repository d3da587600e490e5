"""QLoRA on a CUDA device: tuneforge's kernels and bitsandbytes' agree there too, and training
runs with the base in 4 bits on the GPU. Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
from adapter_testkit import fit_losses, make_model, tokens
from torch import nn

from tuneforge import adapters as A
from tuneforge.quant import QuantLinear, quantize_model
from tuneforge.quant.blockwise import dequantize_4bit, quantize_4bit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_codes_on_cuda_equal_codes_on_cpu():
    w = torch.randn(512, 256) * 0.02
    cpu = quantize_4bit(w, 64, "nf4", double_quant=True)
    gpu = quantize_4bit(w.cuda(), 64, "nf4", double_quant=True)
    assert torch.equal(gpu.data.cpu(), cpu.data)
    assert torch.equal(gpu.absmax.cpu(), cpu.absmax)
    torch.testing.assert_close(dequantize_4bit(gpu).cpu(), dequantize_4bit(cpu))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_and_native_kernels_agree_on_cuda(compute_dtype):
    lin = nn.Linear(256, 384).cuda()
    layers = {b: QuantLinear.from_linear(lin, compute_dtype=compute_dtype, backend=b) for b in ("native", "bitsandbytes")}
    assert torch.equal(layers["native"].dequantize(torch.float32), layers["bitsandbytes"].dequantize(torch.float32))
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    outs = {b: layer(x) for b, layer in layers.items()}
    torch.testing.assert_close(outs["native"], outs["bitsandbytes"])


def test_qlora_trains_on_cuda():
    model = make_model("llama").cuda()
    quantize_model(model, compute_dtype="bfloat16")
    assert all(m.qweight.is_cuda for m in model.modules() if isinstance(m, QuantLinear))
    A.add_adapter(model, A.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    losses = fit_losses(model, tokens(batch=4, length=16).cuda(), steps=10)
    assert losses[-1] < losses[0], losses
