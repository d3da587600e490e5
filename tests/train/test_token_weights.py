"""LLaMA-Factory's use_dft_loss / use_eaft_loss: each reply token's cross-entropy weighted (no
gradient through the weight), equal to the formula written out on full logits, in the fused and the
plain paths, and wired through `stage: sft`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.fused_loss import linear_cross_entropy
from tuneforge.train.token_weights import dft_weight, eaft_weight


def _hand(logits, labels, kind, alpha=1.0):
    """LLaMA-Factory's DFT / EAFT loss sums, written out on full logits."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        if kind == "dft":
            w = torch.exp(-ce)
        else:
            top = torch.topk(logits, 20, dim=-1).values
            logp = top - torch.logsumexp(top, -1, keepdim=True)
            w = (-(logp.exp() * logp).sum(-1) / 3.0) ** alpha
    return (ce * w).sum()


@pytest.mark.parametrize("kind, weight", [("dft", dft_weight), ("eaft", eaft_weight(0.5))])
def test_fused_weighted_loss_and_grads_equal_the_formula(kind, weight):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (37,))
    got = linear_cross_entropy(hidden, head, labels, chunk_rows=8, token_weight=weight)
    got.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    want = _hand(head(hidden), labels, kind, alpha=0.5)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], head.weight.grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(want, F.cross_entropy(head(hidden), labels, reduction="sum"))


def test_plain_path_equals_fused_path(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.train.token_loss import TokenLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    sums = [TokenLoss(model, model, mode, dft_weight)(batch)[0] for mode in ("fused", "plain", "sparse")]
    for other in sums[1:]:
        torch.testing.assert_close(sums[0], other, rtol=1e-5, atol=1e-5)
    plain, _ = TokenLoss(model, model, "plain")(batch)
    assert sums[0] < plain  # p < 1 scales every token's loss down


def test_settings_reach_sft_and_contradictions_are_one_line(tiny_model_dir, tiny_data_dir, tmp_path):
    from tuneforge.workflows import train

    base = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
            "max_steps": 2, "cutoff_len": 64, "disable_tqdm": True, "output_dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="'use_dft_loss' and 'use_eaft_loss' are both true"):
        load_config(None, {**base, "use_dft_loss": True, "use_eaft_loss": True})
    with pytest.raises(ConfigError, match="config key 'use_eaft_loss' is read by stage: sft"):
        load_config(None, {**base, "stage": "pt", "use_eaft_loss": True})
    result = train(load_config(None, {**base, "use_eaft_loss": True, "eaft_alpha": 0.5}))
    assert (tmp_path / "out" / "adapter_model.safetensors").exists() and result


def test_the_sft_stage_objective_weights_as_its_settings_say(tiny_model_dir):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from tuneforge.train.stages import get_stage

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone()}
    args = SimpleNamespace(fused_cross_entropy=None)
    stage = get_stage("sft")

    def loss(**settings):
        values = {"use_dft_loss": False, "use_eaft_loss": False, "eaft_alpha": 1.0, **settings}
        return stage.objective(model, model, batch, args, nullcontext, settings=values).loss(model, batch)[0]

    plain, dft = loss(), loss(use_dft_loss=True)
    torch.testing.assert_close(dft, _hand(model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size),
                                          ids[:, 1:].reshape(-1), "dft"), rtol=1e-4, atol=1e-4)
    assert dft < plain
