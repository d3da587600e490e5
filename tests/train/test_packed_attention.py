"""Packed rows on tiny models: logits, loss and LoRA gradients equal the padded batch's; the
per-sequence (varlen) attention equals transformers' masked path and is only taken where the
mask is block-diagonal causal; anything else runs transformers' sdpa unchanged."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters"))
from adapter_testkit import VOCAB, make_model  # noqa: E402

from tuneforge.adapters import LoraConfig, add_adapter  # noqa: E402
from tuneforge.data import IGNORE_INDEX, PackingCollator, PaddingCollator  # noqa: E402
from tuneforge.train import packed_attention as pa  # noqa: E402
from tuneforge.train.packed_attention import (  # noqa: E402
    NAME,
    block_causal_starts,
    restore_attention,
    use_packed_attention,
    varlen_attention,
)
from tuneforge.train.token_loss import TokenLoss  # noqa: E402

LENGTHS = (9, 3, 14, 6)


def examples(lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]  # a masked prompt, like SFT
        out.append({"input_ids": ids, "labels": labels})
    return out


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


class CountVarlen:
    """Counts calls of the per-sequence path."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = pa.segment_attention

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(pa, "segment_attention", spy)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")  # gpt2's Conv1D layers
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_packed_logits_loss_and_lora_grads_equal_the_padded_batch(kind, monkeypatch):
    model = make_model(kind)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    data = examples()
    padded = PaddingCollator(pad_token_id=0)(data)
    packed = PackingCollator()(data)
    with torch.no_grad():
        reference = model(**inputs(padded)).logits
    use_packed_attention(model)
    varlen = CountVarlen(monkeypatch)
    with torch.no_grad():
        got = model(**inputs(packed)).logits[0]
    assert varlen.calls == model.config.num_hidden_layers  # the per-sequence path ran
    start = 0
    for row, n in enumerate(LENGTHS):  # every real position
        torch.testing.assert_close(got[start:start + n], reference[row, :n], atol=2e-5, rtol=1e-5)
        start += n

    def loss_and_grads(batch, mode):
        model.zero_grad(set_to_none=True)
        loss, count = TokenLoss(model, model, mode)(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), count, grads

    model.train()  # no dropout configured: train mode only changes what transformers does
    for mode in ("plain", "sparse"):
        loss_packed, n_packed, g_packed = loss_and_grads(packed, mode)
        loss_padded, n_padded, g_padded = loss_and_grads(padded, mode)
        assert n_packed == n_padded > 0
        torch.testing.assert_close(loss_packed, loss_padded, atol=1e-4, rtol=1e-5)
        assert g_packed.keys() == g_padded.keys() and any("lora_A" in k for k in g_packed)
        for name in g_packed:
            torch.testing.assert_close(g_packed[name], g_padded[name], atol=1e-5, rtol=1e-4,
                                       msg=name)


def test_varlen_equals_transformers_masked_packed_path(monkeypatch):
    """Same packed row: transformers' own sdpa (block-diagonal mask over the whole row) against
    the per-sequence path, forward and input gradients."""
    model = make_model("llama").train()
    model.config.use_cache = False  # transformers' packed mask needs it (see packed_attention)
    packed = PackingCollator()(examples())
    embeds = model.get_input_embeddings()(packed["input_ids"]).detach()

    def run():
        x = embeds.clone().requires_grad_(True)
        out = model(inputs_embeds=x, position_ids=packed["position_ids"]).logits
        out.square().mean().backward()
        return out.detach(), x.grad

    masked_out, masked_grad = run()
    use_packed_attention(model)
    varlen = CountVarlen(monkeypatch)
    varlen_out, varlen_grad = run()
    assert varlen.calls == model.config.num_hidden_layers
    torch.testing.assert_close(varlen_out, masked_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(varlen_grad, masked_grad, atol=1e-6, rtol=1e-4)


def test_varlen_attention_on_raw_tensors_with_gqa():
    torch.manual_seed(0)
    lengths = [5, 1, 7]
    q = torch.randn(1, 4, 13, 8)
    k, v = torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    idx = torch.arange(13)
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=mask).transpose(1, 2)
    got = varlen_attention(q, k, v, [0, 5, 6], kv_groups=2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert block_causal_starts(mask[None, None]) == [0, 5, 6]


def test_only_block_diagonal_causal_masks_take_the_fast_path():
    idx = torch.arange(6)
    causal = idx[None, :] <= idx[:, None]
    seg = torch.tensor([0, 0, 0, 1, 1, 1])
    block = causal & (seg[:, None] == seg[None, :])
    assert block_causal_starts(block[None, None]) == [0, 3]
    assert block_causal_starts(causal[None, None]) == [0]
    window = block & (idx[:, None] - idx[None, :] < 2)  # sliding window inside the blocks
    assert block_causal_starts(window[None, None]) is None
    holes = block.clone()
    holes[5, 4] = False
    assert block_causal_starts(holes[None, None]) is None
    assert block_causal_starts(torch.stack([block, block])[:, None]) is None  # two rows
    assert block_causal_starts(block[None, None].float()) is None  # additive masks: not ours
    assert block_causal_starts(None) is None


def test_padded_batches_and_generation_are_plain_sdpa(monkeypatch):
    model = make_model("qwen2")
    padded = PaddingCollator(pad_token_id=0)(examples())
    prompt = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        reference = model(**inputs(padded)).logits
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    previous = use_packed_attention(model)
    assert model.config._attn_implementation == NAME
    varlen = CountVarlen(monkeypatch)
    with torch.no_grad():
        assert torch.equal(model(**inputs(padded)).logits, reference)
        again = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(again, generated) and varlen.calls == 0
    restore_attention(model, previous)
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True


def test_sliding_window_layers_stay_exact_through_the_mask(monkeypatch):
    """Qwen2 with a 4-token sliding window: the packed mask is not plain block-causal, so those
    layers run the masked sdpa, and the result still equals the padded batch."""
    model = make_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding_attention" in model.config.layer_types
    data = examples()
    with torch.no_grad():
        reference = model(**inputs(PaddingCollator(pad_token_id=0)(data))).logits
    use_packed_attention(model)
    varlen = CountVarlen(monkeypatch)
    with torch.no_grad():
        got = model(**inputs(PackingCollator()(data))).logits[0]
    assert varlen.calls == model.config.layer_types.count("full_attention")
    torch.testing.assert_close(got[:LENGTHS[0]], reference[0, :LENGTHS[0]], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[-LENGTHS[-1]:], reference[-1, :LENGTHS[-1]], atol=2e-5,
                               rtol=1e-5)
