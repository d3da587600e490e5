"""QuantLinear and QLoRA on tiny models: equal to the same model with dequantized fp weights."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_testkit import fit_losses, logits, make_model, tokens
from torch import nn

from tuneforge import adapters as A
from tuneforge.errors import ConfigError
from tuneforge.quant import QuantLinear, dequantize_model, quantize_model, quantized_bytes
from tuneforge.quant import linear as qlinear
from tuneforge.quant.blockwise import dequantize_4bit

BACKENDS = ["native", "bitsandbytes"]  # bitsandbytes is a test dependency
FORMATS = [dict(bits=4, quant_type="nf4"), dict(bits=4, quant_type="fp4", double_quant=False), dict(bits=8)]


def _oracle(model: nn.Module) -> nn.Module:
    """A copy of the quantized model with every QuantLinear replaced by its dequantized Linear."""
    ref = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f['bits']}bit-{f.get('quant_type', 'int8')}")
def test_layer_forward_backward_equal_dequantized(fmt, backend):
    torch.manual_seed(0)
    lin = nn.Linear(192, 320)
    q = QuantLinear.from_linear(lin, compute_dtype=torch.float32, backend=backend, **fmt)
    w = q.dequantize()
    assert w.shape == lin.weight.shape and w.dtype == torch.float32
    x = torch.randn(3, 7, 192, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2, w, lin.bias)
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []
    assert (w - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()  # NF4: half its widest gap (0.14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_features", [96, 128])  # 96: chunks must still start on block edges
def test_row_chunks_give_the_same_result(monkeypatch, backend, in_features):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 200)
    whole = QuantLinear.from_linear(lin, compute_dtype=torch.float32, backend=backend)
    # whichever kernel decodes, the values are those of the codes
    native = whole.codes()
    assert torch.equal(whole.dequantize(), dequantize_4bit(native).view(200, in_features))
    monkeypatch.setattr(qlinear, "CHUNK_VALUES", in_features * 7)
    chunked = QuantLinear.from_linear(lin, compute_dtype=torch.float32, backend=backend)
    assert 1 < chunked._rows_per_chunk < 200 and (chunked._rows_per_chunk * in_features) % 64 == 0
    assert torch.equal(chunked.dequantize(), whole.dequantize())
    x = torch.randn(5, in_features, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    chunked(x).sum().backward()
    whole(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_autograd_keeps_no_copy_of_the_weight():
    lin = nn.Linear(256, 512)
    q = QuantLinear.from_linear(lin, compute_dtype=torch.float32, backend="native")
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert all(t.numel() < 256 * 512 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_qlora_trains_like_lora_on_the_dequantized_model(kind, use_dora):
    model = make_model(kind)
    quantize_model(model, compute_dtype="float32", backend="native")
    ref = _oracle(model)
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)
    cfg = A.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, init_lora_weights="gaussian")
    for m in (model, ref):
        torch.manual_seed(3)
        A.add_adapter(m, cfg)
        m.train()
    model(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and all("lora" in n for n in ours)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6, msg=n)
    # nothing but the adapters can change: no quantized buffer takes part in autograd
    assert all(not b.requires_grad for b in model.buffers())


def test_loss_falls_when_training_on_a_4bit_base():
    model = make_model("llama")
    quantize_model(model, compute_dtype="float32")
    A.add_adapter(model, A.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    losses = fit_losses(model, tokens(batch=4, length=16), steps=12)
    assert losses[-1] < 0.9 * losses[0], losses


def test_quantize_after_adding_lora_keeps_the_adapters():
    model = make_model("llama")
    torch.manual_seed(1)
    A.add_adapter(model, A.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    quantize_model(model, compute_dtype="float32")
    after = {n: p for n, p in model.named_parameters() if "lora" in n}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, QuantLinear) and isinstance(q_proj, A.LoraLayer)
    ref = _oracle(model)
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


def test_merge_is_refused_and_dequantize_then_merge_is_exact():
    model = make_model("llama")
    quantize_model(model, compute_dtype="float32")
    torch.manual_seed(2)
    A.add_adapter(model, A.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    ids = tokens()
    expected = logits(model, ids)
    with pytest.raises(ConfigError, match="quantized .*4-bit nf4.*dequantize_model"):
        A.merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected)  # nothing was half merged
    dequantize_model(model)
    A.merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_weight_rewriting_inits_are_refused():
    model = make_model("llama")
    quantize_model(model)
    with pytest.raises(ConfigError, match="quantized here; use loftq_iter"):
        A.add_adapter(model, A.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_skips_head_and_tied_weights_and_saves_bytes():
    model = make_model("llama", tie_word_embeddings=False)
    quantize_model(model)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    held, bf16 = quantized_bytes(model)
    assert 0 < held <= 0.27 * bf16
    held8, bf16_8 = quantized_bytes(quantize_model(make_model("llama"), bits=8))
    assert held8 <= 0.54 * bf16_8  # 1 byte per value + one fp32 absmax per 64-wide row


def test_bf16_compute_dtype():
    lin = nn.Linear(64, 64)
    q = QuantLinear.from_linear(lin, compute_dtype=torch.bfloat16, backend="native")
    x = torch.randn(2, 64)
    y = q(x)
    assert y.dtype == torch.float32  # computed in bf16, returned in the input's dtype
    ref = (x.bfloat16() @ q.dequantize(torch.bfloat16).t() + lin.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref)
    assert (y - lin(x)).abs().max() < 0.1 * lin(x).abs().max()


def test_bad_arguments():
    with pytest.raises(ConfigError, match="quantization_bit must be 4 or 8"):
        quantize_model(make_model("llama"), bits=3)
    with pytest.raises(ConfigError, match="quantization_type must be nf4 or fp4"):
        quantize_model(make_model("llama"), quant_type="int4")
    with pytest.raises(ConfigError, match="quantization_backend"):
        quantize_model(make_model("llama"), backend="gptq")
