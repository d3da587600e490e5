"""A micro-batch of sft / pt as parts, one forward and backward each (train/parts.py, the loop's
Objective.split). Oracles: the unsplit micro-batch. The parts' losses, label counts and every
adapter gradient add up to the whole micro-batch's (padded and packed rows, the fused, sparse,
DFT, EAFT and ASFT losses, multi-task LoRA's task ids, lean layers); a whole run trains the same
adapter with and without parts; a part never holds more token positions than the longest example."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import write_dataset
from tests.train.test_loop import tiny_cfg
from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.adapters.training_hooks import batch_context
from tuneforge.data import PackingCollator, PaddingCollator
from tuneforge.data.collate import TASK_ID
from tuneforge.train import parts
from tuneforge.train.stages.sft import token_objective
from tuneforge.train.token_loss import label_count
from tuneforge.workflows import train

LENGTHS = (9, 23, 5, 14)  # packed: [9], [23], [5, 14]; padded, longest first: [23], [14], [9, 5]
VOCAB = 256


def examples(lengths=LENGTHS, seed=0, tasks=None):
    """Random examples whose first third is an unlabelled prompt; `tasks`: a task id each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        out.append({"input_ids": ids, "labels": labels, **({TASK_ID: tasks[i]} if tasks else {})})
    return out


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, use_cache=False))


def adapted(config):
    """A tiny Llama with `config` on every linear layer, its B's moved off zero (every gradient non-zero)."""
    model = add_adapter(tiny_llama(), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def run(model, objective, batches):
    """Summed loss, label count and adapter gradients of forward + backward over `batches`."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for batch in batches:
        with batch_context(model, batch):
            loss, n, _ = objective.loss(model, batch)
            loss.backward()
        total, count = total + loss.item(), count + n
    return total, count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_parts_equal_whole(model, objective, batch, expected_parts):
    pieces = objective.parts(model, batch)
    assert len(pieces) == expected_parts
    assert sum(label_count(p) for p in pieces) == label_count(batch)
    whole, split = run(model, objective, [batch]), run(model, objective, pieces)
    assert split[1] == whole[1] == label_count(batch)
    assert split[0] == pytest.approx(whole[0], rel=1e-6)
    assert whole[2].keys() == split[2].keys() and whole[2]
    for name, grad in whole[2].items():
        # fp32 rounding of sums in another order: ~5e-7 of the largest entry
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (split[2][name] - grad).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("settings, fused", [({}, None), ({}, False), ({"use_dft_loss": True}, None),
                                             ({"use_eaft_loss": True, "eaft_alpha": 1.0}, False),
                                             ({"use_asft_loss": True, "asft_alpha": 0.1}, False)],
                         ids=["fused", "sparse", "dft", "eaft", "asft"])
def test_parts_give_the_whole_micro_batch_loss_and_gradients(packed, settings, fused):
    from tuneforge.train.lean_layers import install_lean_layers
    from tuneforge.train.lean_mlp import install_lean_mlp
    from tuneforge.train.packed_attention import use_packed_attention

    model = adapted(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if packed:
        use_packed_attention(model)
    assert install_lean_mlp(model) and install_lean_layers(model)  # as a default run keeps activations
    batch = (PackingCollator() if packed else PaddingCollator(0))(examples())
    objective = token_objective(model, model, batch, SimpleNamespace(fused_cross_entropy=fused), nullcontext,
                                settings=settings)
    assert_parts_equal_whole(model, objective, batch, expected_parts=3)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_multitask_ids_go_with_their_tokens(packed):
    from tuneforge import LoraMultitaskConfig

    model = adapted(LoraMultitaskConfig(tasks=["a", "b", "c"], shared_r=4, task_r=2, lora_alpha=8, task_alpha=6,
                                        target_modules="all-linear"))
    batch = (PackingCollator() if packed else PaddingCollator(0))(examples(tasks=[2, 0, 1, 0]))
    assert "task_ids" in batch
    objective = token_objective(model, model, batch, SimpleNamespace(fused_cross_entropy=None), nullcontext)
    assert_parts_equal_whole(model, objective, batch, expected_parts=3)


def test_packed_parts_are_runs_of_whole_examples():
    batch = PackingCollator()(examples())
    pieces = parts.split_batch(batch)
    assert [p["input_ids"].shape[1] for p in pieces] == [9, 23, 5 + 14]
    for key, value in batch.items():
        assert torch.equal(torch.cat([p[key] for p in pieces], dim=1), value), key
    assert all(p["position_ids"][0, 0] == 0 for p in pieces)


def test_padded_parts_are_whole_rows_without_their_padding():
    batch = PaddingCollator(0)(examples())
    pieces = parts.split_batch(batch)
    assert [tuple(p["input_ids"].shape) for p in pieces] == [(1, 23), (1, 14), (2, 9)]
    rows = [batch["input_ids"][r] for r in (1, 3, 0, 2)]  # longest first
    got = [row for p in pieces for row in p["input_ids"]]
    for want, row in zip(rows, got):
        assert torch.equal(row, want[:len(row)]) and (want[len(row):] == 0).all()
    # no part holds more token positions than the longest example
    assert max(p["input_ids"].numel() for p in pieces) <= max(LENGTHS)
    # the trimmed columns were padding without a label
    assert sum(p["attention_mask"].sum() for p in pieces) == batch["attention_mask"].sum()


def test_parts_fill_up_to_the_budget():
    """Whole examples up to `budget` token positions a part (or the longest example, if longer)."""
    packed = parts.split_batch(PackingCollator()(examples()), budget=30)
    assert [p["input_ids"].shape[1] for p in packed] == [9, 23 + 5, 14]
    padded = parts.split_batch(PaddingCollator(0)(examples()), budget=30)
    assert [tuple(p["input_ids"].shape) for p in padded] == [(1, 23), (2, 14), (1, 5)]
    assert len(parts.split_batch(PackingCollator()(examples()), budget=51)) == 1  # all fit: whole
    assert len(parts.split_batch(PaddingCollator(0)(examples()), budget=4 * 23)) == 1


def test_what_runs_whole():
    one = PaddingCollator(0)(examples(lengths=(7,)))
    assert parts.split_batch(one) == [one]
    same = PackingCollator()(examples(lengths=(6, 6)))
    assert len(parts.split_batch(same)) == 2  # two examples of the longest length: one each
    odd = {**PaddingCollator(0)(examples()), "pixel_values": torch.zeros(4, 3, 8, 8)}  # not shaped like input_ids
    assert parts.split_batch(odd) == [odd]
    no_positions = {k: v for k, v in PackingCollator()(examples()).items() if k != "position_ids"}
    assert parts.split_batch(no_positions) == [no_positions]  # where the examples begin is unknown


def test_a_forward_term_of_the_whole_batch_keeps_it_whole():
    """lora_moe's load balance counts the tokens of each forward: its micro-batches are not split."""
    from tuneforge import LoraMoeConfig

    moe = adapted(LoraMoeConfig(r=2, num_experts=2, top_k=1, target_modules="all-linear"))
    assert "lora_moe" in parts.whole_reason(moe)
    batch = PackingCollator()(examples())
    objective = token_objective(moe, moe, batch, SimpleNamespace(fused_cross_entropy=None), nullcontext)
    assert parts.keep_whole(objective, moe).split is None  # what the loop runs
    assert parts.plan(moe, 4, 64)[0] == 4 * 64
    plain = adapted(LoraConfig(r=2, target_modules="all-linear"))
    assert parts.whole_reason(plain) is None and parts.plan(plain, 4, 64)[0] == 64


@pytest.mark.parametrize("packing", [True, False])
def test_a_run_trains_the_same_adapter_in_parts(packing, tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Two steps of batch 4 x accumulation 2 on examples of different lengths, with parts and
    without (whole_reason patched to keep every micro-batch whole): the same adapter."""
    from safetensors.torch import load_file

    records = [{"instruction": "Repeat: " + " ".join(["word"] * (1 + 5 * (i % 4))), "input": "",
                "output": " ".join(["word"] * (1 + 3 * (i % 3)))} for i in range(16)]
    data = write_dataset(tmp_path / "data", "arith", records)
    common = dict(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1.0,
                  adam_epsilon=1.0, val_size=0, eval_on_start=False, max_grad_norm=0.0,
                  lr_scheduler_type="constant", packing=packing)
    counts, sizes = [], []
    real = parts.split_batch

    def spy(batch, budget=None):
        out = real(batch, budget)
        counts.append(len(out))
        sizes.extend(p["input_ids"].numel() for p in out)
        return out

    monkeypatch.setattr(parts, "split_batch", spy)
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        train(tiny_cfg(tiny_model_dir, data, tmp_path / "parts", **common))
    assert len(counts) == 4 and max(counts) > 1
    assert max(sizes) <= 64  # cutoff_len, the budget of a part
    assert any(r.getMessage().startswith("micro-batches: each runs as parts") for r in caplog.records)
    monkeypatch.setattr(parts, "whole_reason", lambda model: "kept whole by the test")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        train(tiny_cfg(tiny_model_dir, data, tmp_path / "whole", **common))
    assert len(counts) == 4  # not split
    assert any(r.getMessage() == "micro-batches: run whole (kept whole by the test)" for r in caplog.records)
    split, whole = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("parts", "whole"))
    assert split.keys() == whole.keys()
    assert any(whole[key].abs().max() > 1e-4 for key in whole if "lora_B" in key)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_before_each_padded_row(kind):
    """Prompt and prefix tuning put virtual tokens before every row (and extend its attention
    mask): trimmed rows still give the whole batch's loss and gradients."""
    import tuneforge

    config = (tuneforge.PromptTuningConfig if kind == "prompt" else tuneforge.PrefixTuningConfig)(num_virtual_tokens=3)
    model = add_adapter(tiny_llama(), config).train()
    batch = PaddingCollator(0)(examples())
    objective = token_objective(model, model, batch, SimpleNamespace(fused_cross_entropy=None), nullcontext)
    assert_parts_equal_whole(model, objective, batch, expected_parts=3)
