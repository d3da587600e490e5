"""The fused, chunked head + cross-entropy equals the plain one (values and gradients), on raw
tensors and on tiny models with LoRA; models whose logits are not head(hidden) are detected."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from tuneforge import adapters
from tuneforge.errors import ConfigError
from tuneforge.train.fused_loss import linear_cross_entropy, probe
from tuneforge.train.token_loss import TokenLoss

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters"))
from adapter_testkit import make_model  # noqa: E402


def _reference(hidden, head, labels):
    return F.cross_entropy(head(hidden), labels, reduction="sum")


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_all_gradients_equal_the_plain_loss(chunk_rows, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(13, 16, requires_grad=True)
    labels = torch.randint(0, 50, (13,))
    scale = 0.37  # backward must scale by the incoming gradient (accumulation, DDP)

    ours = linear_cross_entropy(hidden, head, labels, chunk_rows=chunk_rows)
    (ours * scale).backward()
    got = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    ref = _reference(hidden, head, labels)
    (ref * scale).backward()
    want = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])

    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_computes_none():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20).requires_grad_(False)
    hidden = torch.randn(5, 8, requires_grad=True)
    labels = torch.randint(0, 20, (5,))
    linear_cross_entropy(hidden, head, labels, chunk_rows=2).backward()
    assert head.weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        value = linear_cross_entropy(hidden, head, labels, chunk_rows=2)
    assert not value.requires_grad
    torch.testing.assert_close(value, _reference(hidden, head, labels).detach())


def test_under_bf16_autocast_it_tracks_the_bf16_plain_loss():
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 64)
    hidden = torch.randn(9, 32, requires_grad=True)
    labels = torch.randint(0, 64, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, head, labels, chunk_rows=4)
        ref = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    ours.backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_lora_grads(model, mode):
    model.zero_grad(set_to_none=True)
    loss, n = TokenLoss(model, model, mode)(_batch())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_fused_loss_on_a_lora_model_equals_the_sparse_and_plain_paths(kind, tied):
    model = make_model(kind, tie_word_embeddings=tied).train()
    adapters.add_adapter(model, adapters.LoraConfig(r=4, target_modules="all-linear",
                                                    init_lora_weights=False))
    assert probe(model, {"input_ids": _batch()["input_ids"][:1, :5]}) is None
    fused = _loss_and_lora_grads(model, "fused")
    for mode in ("sparse", "plain"):
        other = _loss_and_lora_grads(model, mode)
        torch.testing.assert_close(fused[0], other[0], rtol=1e-6, atol=1e-5)
        assert fused[1] == other[1] == 8 + 8 + 5  # labels at positions 4..11, 4..8 in the short row
        assert fused[2].keys() == other[2].keys() and fused[2]
        for k in fused[2]:
            torch.testing.assert_close(fused[2][k], other[2][k], rtol=1e-5, atol=1e-6)


def test_full_finetuning_gets_the_same_head_gradient():
    model = make_model("llama", tie_word_embeddings=False).train()
    fused = _loss_and_lora_grads(model, "fused")
    plain = _loss_and_lora_grads(model, "plain")
    torch.testing.assert_close(fused[2]["lm_head.weight"], plain[2]["lm_head.weight"],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[2]["model.embed_tokens.weight"],
                               plain[2]["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6)


def _soft_capped_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=256, final_logit_softcapping=0.5)
    return Gemma2ForCausalLM(cfg)


def test_soft_capped_logits_are_detected_and_fall_back_or_fail_clearly():
    model = _soft_capped_model()
    batch = _batch()
    assert "soft-capping" in probe(model, {"input_ids": batch["input_ids"][:1, :6]})
    assert TokenLoss.choose(model, model, batch, None).mode == "sparse"
    with pytest.raises(ConfigError, match="fused_cross_entropy"):
        TokenLoss.choose(model, model, batch, True)
    assert TokenLoss.choose(make_model("llama"), make_model("llama"), batch, None).mode == "fused"
    assert TokenLoss.choose(make_model("llama"), make_model("llama"), batch, False).mode == "sparse"


def test_a_lora_adapted_head_is_not_fused():
    model = make_model("llama", tie_word_embeddings=False)
    adapters.add_adapter(model, adapters.LoraConfig(r=2, target_modules=["lm_head"]))
    assert "not a plain Linear" in probe(model, {"input_ids": _batch()["input_ids"][:1, :5]})


def test_a_training_run_logs_the_same_losses_with_and_without_fusion(tiny_model_dir, tiny_data_dir, tmp_path):
    import json

    from tuneforge.config import load_config
    from tuneforge.workflows import train

    def run(name, fused):
        out = tmp_path / name
        train(load_config(None, {
            "model_name_or_path": str(tiny_model_dir), "dataset": "arith",
            "dataset_dir": str(tiny_data_dir), "output_dir": str(out), "cutoff_len": 64,
            "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_steps": 4,
            "logging_steps": 1, "lora_rank": 4, "disable_tqdm": True, "bf16": False,
            "val_size": 4, "fused_cross_entropy": fused, "save_strategy": "no"}))
        log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        return [e.get("loss", e.get("eval_loss")) for e in log]

    fused, plain = run("fused", True), run("plain", False)
    assert len(fused) == len(plain) >= 5
    assert fused == pytest.approx(plain, rel=1e-4)
