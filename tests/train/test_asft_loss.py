"""LLaMA-Factory's use_asft_loss / asft_alpha (stage sft): sum over labelled tokens of
CE * p(label) (no gradient through p) + alpha * KL(reference || model), the reference being the
model with its adapters disabled (LoRA) or a frozen copy made before training (full); equal, with
its gradients, to the formula written out here on full logits; contradictions refused in one line."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.train.stages import get_stage

ALPHA = 0.3


def _model(model_dir, adapter: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9:] = -100
    return {"input_ids": ids, "labels": labels}


def _hand(logits, reference, labels):
    """sum_t CE_t * exp(-CE_t).detach() + ALPHA * sum_v q_v (log q_v - log p_v), over labelled t."""
    z, r, y = logits[:, :-1], reference[:, :-1], labels[:, 1:]
    keep = y != -100
    log_p = torch.log_softmax(z[keep].float(), -1)
    log_q = torch.log_softmax(r[keep].float(), -1)
    ce = -log_p.gather(1, y[keep][:, None]).squeeze(1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (ce * torch.exp(-ce).detach()).sum() + ALPHA * kl.sum(), int(keep.sum())


def _objective(model):
    settings = {"use_dft_loss": False, "use_eaft_loss": False, "eaft_alpha": 1.0, "use_asft_loss": True,
                "asft_alpha": ALPHA, "fused_cross_entropy": None}
    return get_stage("sft").objective(model, model, _batch(), SimpleNamespace(fused_cross_entropy=None), nullcontext,
                                      settings=settings)


def _moved(model, names=("lora_B",)):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.add_(torch.randn(p.shape) * 0.3)


def test_lora_asft_equals_the_formula_with_its_gradients(tiny_model_dir):
    model = _model(tiny_model_dir, adapter=True)
    objective = _objective(model)
    _moved(model)  # training moved the adapter: the model now differs from its reference
    batch = _batch()
    got, count = objective.loss(model, batch)[:2]
    got.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.no_grad():
        from tuneforge.adapters import disable_adapters

        with disable_adapters(model):
            reference = model(input_ids=batch["input_ids"]).logits
    want, want_count = _hand(model(input_ids=batch["input_ids"]).logits, reference, batch["labels"])
    want.backward()
    assert count == want_count == objective.count(batch) == 11
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    kl_free, _ = _hand(model(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits,
                       batch["labels"])
    assert want > kl_free + 1e-4  # the KL term is there


def test_full_finetuning_takes_a_frozen_copy_made_before_training(tiny_model_dir, caplog):
    model = _model(tiny_model_dir, adapter=False)
    batch = _batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    with caplog.at_level("INFO", logger="tuneforge"):
        objective = _objective(model)
    assert "frozen copy" in caplog.text
    _moved(model, names=("q_proj",))
    got = objective.loss(model, batch)[0]
    torch.testing.assert_close(got, _hand(model(input_ids=batch["input_ids"]).logits, before, batch["labels"])[0],
                               rtol=1e-5, atol=1e-5)


def test_keys_reach_sft_and_contradictions_are_one_line(tiny_model_dir, tiny_data_dir, tmp_path):
    from tuneforge.workflows import train

    base = {"model_name_or_path": str(tiny_model_dir), "dataset": "arith", "dataset_dir": str(tiny_data_dir),
            "max_steps": 1, "cutoff_len": 64, "disable_tqdm": True, "output_dir": str(tmp_path / "out")}
    for extra, line in [({"use_dft_loss": True}, "'use_dft_loss' and 'use_asft_loss' are both true"),
                        ({"fused_cross_entropy": True}, "'use_asft_loss' needs the logits"),
                        ({"stage": "pt"}, "config key 'use_asft_loss' is read by stage: sft")]:
        with pytest.raises(ConfigError, match=line) as err:
            load_config(None, {**base, "use_asft_loss": True, **extra})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="'pissa_init' rewrites the base weights"):
        load_config(None, {**base, "use_asft_loss": True, "pissa_init": True})
    assert train(load_config(None, {**base, "use_asft_loss": True, "asft_alpha": 0.05}))
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
