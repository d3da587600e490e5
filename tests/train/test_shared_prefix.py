"""Shared-prefix rows (data/shared_prefix.py, train/shared_prefix.py): a pair's prompt runs once
and its two replies each see only it. The attention of such a row equals dense sdpa under its
mask; the reply log-probs and the DPO loss's LoRA gradients equal the padded batch's; the probe
chooses them on Llama and pads for a model that ignores position_ids; a dpo run on them
equals the padded run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.test_dpo import EXAMPLES, dpo_values, objective_on, oracle, tiny_model, toy_pairs
from tests.train.test_packing_runs import data_args, tiny_llama
from tuneforge.data.pairwise import PairwiseCollator
from tuneforge.data.shared_prefix import SharedPrefixCollator
from tuneforge.errors import ConfigError
from tuneforge.train import packed_attention as pa
from tuneforge.train.logps import reply_logps
from tuneforge.train.shared_prefix import choose_pair_collator
from tuneforge.workflows import train


def loss_and_grads(model, objective_on, batch):
    """(loss, count, metric sums, LoRA gradients) of the stage objective's loss on `batch`."""
    model.zero_grad()
    loss, count, metrics = objective_on(model, batch).loss(model, batch)
    loss.backward()
    return loss, count, metrics, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_run(run, padded_run, count: int):
    loss, n, metrics, grads = run
    loss_p, n_p, metrics_p, grads_p = padded_run
    assert n == n_p == count and grads.keys() == grads_p.keys() and grads
    torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
    assert metrics == pytest.approx(metrics_p, rel=1e-4, abs=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_p[name], rtol=1e-4, atol=1e-6)


def test_segments_of_a_shared_prefix_row_and_their_attention():
    batch = SharedPrefixCollator()(EXAMPLES[:2])
    # pair 0: prompt 0-2, chosen 3-4, rejected 5 (sees 0-2); pair 1: prompt 6-7, chosen 8, rejected 9-12
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 4, 5]
    segments = pa.causal_segments(batch["attention_mask"])
    assert segments == [(0, 0, 0, 5), (0, 3, 5, 6), (6, 6, 6, 9), (6, 8, 9, 13)]
    assert pa.block_causal_starts(batch["attention_mask"]) is None  # not plain packing
    # the first rejected token is scored from the prompt's last position (2), not the chosen reply's
    assert batch["score_from"].tolist() == [2, 3, 2, 7, 7, 9, 10, 11]
    assert batch["score_row"].tolist() == [0, 0, 2, 1, 3, 3, 3, 3]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 13, 8, generator=g, requires_grad=True) for _ in range(3))
    kv = [t.detach()[:, ::2].clone().requires_grad_() for t in (k, v)]  # GQA: 2 key heads for 4 query heads
    got = pa.segment_attention(q, *kv, segments, kv_groups=2)
    want = F.scaled_dot_product_attention(q, *kv, attn_mask=batch["attention_mask"], enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), [q, *kv])
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), [q, *kv])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    holes = batch["attention_mask"].clone()
    holes[0, 0, 5, 1] = False  # a rejected token that misses a prompt token: not a segment row
    assert pa.causal_segments(holes) is None
    leak = batch["attention_mask"].clone()
    leak[0, 0, 5, 4] = True  # the rejected reply seeing the chosen one
    assert pa.causal_segments(leak) is None


def test_shared_prefix_logps_and_dpo_gradients_equal_the_padded_batch(tiny_model_dir, monkeypatch):
    model = tiny_model(tiny_model_dir)
    choice = choose_pair_collator(data_args(), model, pad_token_id=0)
    assert isinstance(choice.collate, SharedPrefixCollator) and "shared-prefix rows: on" in choice.note
    calls = []
    original = pa.segment_attention
    monkeypatch.setattr(pa, "segment_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    shared = choice.collate(EXAMPLES)
    want, want_counts = oracle(model)
    for head_at_labels in (True, False):
        logps, counts = reply_logps(model, model, shared, head_at_labels)
        torch.testing.assert_close(logps, want, rtol=1e-4, atol=1e-4)
        assert counts.tolist() == want_counts.tolist()
    assert len(calls) == 2 * model.config.num_hidden_layers  # the segment path ran in every layer

    shared_run = loss_and_grads(model, objective_on, shared)
    choice.undo()
    assert_same_run(shared_run, loss_and_grads(model, objective_on, PairwiseCollator(0)(EXAMPLES)), count=3)


class NoPositions(torch.nn.Module):
    """A Llama that never reads position_ids (it numbers every row 0, 1, 2, ...)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_llama()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_the_probe_pads_where_the_model_ignores_position_ids():
    model = NoPositions()
    choice = choose_pair_collator(data_args(), model, pad_token_id=0)
    assert isinstance(choice.collate, PairwiseCollator)
    assert "shared-prefix rows: off" in choice.note and "shared-prefix logits differ from padded" in choice.note
    with pytest.raises(ConfigError, match="config key 'packing' is true, but shared-prefix rows"):
        choose_pair_collator(data_args(packing=True), model, pad_token_id=0)
    assert choose_pair_collator(data_args(packing=False), model, pad_token_id=0).note is None


def test_a_dpo_run_on_shared_prefix_rows_equals_the_padded_run(tiny_model_dir, tmp_path):
    data = toy_pairs(tmp_path / "data")
    runs = {packing: train(dpo_values(tiny_model_dir, data, tmp_path / str(packing), packing=packing,
                                      max_steps=4, save_steps=100, val_size=4))
            for packing in (None, False)}
    for key in ("train_loss", "eval_loss", "eval_rewards/margins"):
        assert runs[None][key] == pytest.approx(runs[False][key], rel=1e-3, abs=1e-5), key


def test_kto_shared_prefix_rows_equal_the_padded_rows(tiny_model_dir, monkeypatch):
    """Loss, metrics and LoRA gradients of stage: kto; cutoff 6 cuts the second KL row's prompt
    (the reference's KL reply then sees only the start of the prompt it shares)."""
    from tests.train.test_kto import objective_on as kto_objective
    from tuneforge.data.kto import KtoCollator
    from tuneforge.data.shared_prefix import KtoSharedCollator
    from tuneforge.train.shared_prefix import choose_shared_prefix

    parts = [([5, 6, 7], [8, 9], 1), ([11, 12, 13, 14, 15], [16], 0), ([18], [19, 20, 21], 1),
             ([22, 23], [24, 25, 26], 0)]  # (prompt, reply, kto_tag), each within the cutoff
    examples = [{"input_ids": p + r, "prompt_len": len(p), "kto_tag": t, "kl_reply": parts[i - 1][1]}
                for i, (p, r, t) in enumerate(parts)]
    model = tiny_model(tiny_model_dir)
    padded = KtoCollator(0, cutoff_len=6)(examples)
    assert padded["kl_input_ids"][1].tolist() == [11, 12, 13, 14, 8, 9]  # the prompt cut to 4 tokens
    choice = choose_shared_prefix(data_args(), model, KtoSharedCollator(6), KtoCollator(0, 6))
    assert isinstance(choice.collate, KtoSharedCollator)
    shared = choice.collate(examples)
    assert shared["input_ids"].shape == (1, 20) and shared["kl_sequences"] == 4  # 4 prompts + 4 replies

    shared_run = loss_and_grads(model, kto_objective, shared)
    choice.undo()
    assert_same_run(shared_run, loss_and_grads(model, kto_objective, padded), count=4)

    # the reference scores the policy's own rows (same layout, same rounding): before training
    # (policy = reference) the KL estimate and the rewards are exactly 0 in any precision
    from tuneforge.train import logps as logps_module

    rows, real = [], logps_module.reply_logps
    monkeypatch.setattr(logps_module, "reply_logps",
                        lambda m, u, b, h: (rows.append(b["input_ids"].tolist()), real(m, u, b, h))[1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    model.to(torch.bfloat16)
    choice = choose_shared_prefix(data_args(), model, KtoSharedCollator(6), KtoCollator(0, 6))
    rows.clear()  # the probe's
    with torch.no_grad():
        _, _, metrics = kto_objective(model, shared).loss(model, shared)
    choice.undo()
    assert len(rows) == 4 and sorted(rows[:2]) == sorted(rows[2:])  # policy: reply, KL rows; reference: the same
    assert shared["klc_input_ids"].tolist() in rows  # the mismatched replies reused the prompts' keys
    assert metrics["kl"] == 0 and metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0


@pytest.mark.parametrize("seen", [None, 0, 1])
def test_continuation_row_reuses_the_prompts_keys_exactly(tiny_model_dir, seen):
    """Mismatched replies scored on a row of their own that attends to the main row's recorded keys
    and values (train/prompt_cache.py) get the log-probs of rows [prompt[:seen] | reply]; a reply
    that sees no prompt token (seen 0) or one (seen 1: no prefix to attend to) too."""
    from tuneforge.data.shared_prefix import continuation_rows, shared_prefix_rows
    from tuneforge.train import prompt_cache

    model = tiny_model(tiny_model_dir)
    previous = pa.use_packed_attention(model)
    assert model.config._attn_implementation == pa.NAME
    prompts = [[5, 6, 7, 8], [11, 12, 13], [18, 30]]
    main = shared_prefix_rows([(p, [(len(p), r)]) for p, r in zip(prompts, [[9, 10], [14], [19, 20, 21]])])
    replies = [[40, 41, 42], [43], [44, 45]]
    sees = [len(p) if seen is None else min(seen, len(p)) for p in prompts]
    sees[1] = 2  # one reply always sees only the start of its prompt
    starts = [0, 6, 10]
    continued = continuation_rows(list(zip(prompts, sees, replies)), starts, main["input_ids"].shape[1])
    alone = shared_prefix_rows([(p[:k], [(k, r)]) for p, k, r in zip(prompts, sees, replies)])
    with torch.no_grad():
        with prompt_cache.capture() as recorded:
            reply_logps(model, model, main, head_at_labels=True)
        with prompt_cache.reuse(recorded, continued["segments"]):
            got, counts = reply_logps(model, model, continued, head_at_labels=True)
        want, want_counts = reply_logps(model, model, alone, head_at_labels=True)
    pa.restore_attention(model, previous)
    assert len(recorded) == model.config.num_hidden_layers and counts.tolist() == want_counts.tolist()
    assert counts.sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_selected_groups_score_as_in_the_whole_micro_batch(tiny_model_dir):
    """select_groups (Objective.split's rows): some pairs of a shared-prefix row or of padded
    pairs, and some examples of kto's rows (main and KL), give those sequences the log-probs
    and counts they have in the whole micro-batch, in the order of the groups asked for."""
    from tests.train.test_kto import EXAMPLES as KTO_EXAMPLES
    from tuneforge.data.kto import KtoCollator
    from tuneforge.data.shared_prefix import (KtoSharedCollator, group_tokens, position_groups,
                                              select_groups)

    model = tiny_model(tiny_model_dir)
    choice = choose_pair_collator(data_args(), model, pad_token_id=0)
    micro = {"dpo shared": (SharedPrefixCollator()(EXAMPLES), "", 3),
             "dpo padded": (PairwiseCollator(0)(EXAMPLES), "", 3),
             "kto shared": (KtoSharedCollator(6)(KTO_EXAMPLES), "", 4),
             "kto shared kl": (KtoSharedCollator(6)(KTO_EXAMPLES), "kl_", 4),
             "kto padded kl": (KtoCollator(0, 6)(KTO_EXAMPLES), "kl_", 4)}
    with torch.no_grad():
        for name, (rows, prefix, n) in micro.items():
            whole = {k[len(prefix):]: v for k, v in rows.items() if k.startswith(prefix)}
            logps, counts = reply_logps(model, model, whole, True)
            replies = logps.numel() // n
            tokens = group_tokens(rows, n, prefix)
            every = whole["attention_mask"].sum() if "labels" in whole else whole["input_ids"].size(1)
            assert int(tokens.sum()) == int(every), name
            for groups in ([1], [0, 2], [2, 0], list(range(n))):
                part = select_groups(rows, groups, n, prefix)
                want = [j * n + k for j in range(replies) for k in groups]
                got, got_counts = reply_logps(model, model, part, True)
                torch.testing.assert_close(got, logps[want], rtol=1e-5, atol=1e-5, msg=name)
                assert got_counts.tolist() == counts[want].tolist(), name
                assert part["input_ids"].size(1) <= whole["input_ids"].size(1)
            if "score_from" in whole:  # one group: its own spans only
                assert select_groups(rows, [1], n, prefix)["input_ids"].size(1) == int(tokens[1])
    choice.undo()
    # a block of the row that scores replies of two prompts is not a shared-prefix layout
    bad = SharedPrefixCollator()(EXAMPLES)
    bad["attention_mask"][0, 0, 6, :6] = True  # pair 1's prompt sees pair 0
    with pytest.raises(ValueError, match="scores replies of two prompts"):
        position_groups(bad, 3)


def test_parts_of_at_most_so_many_tokens():
    from tuneforge.train.parts import part_groups

    tokens = torch.tensor([300, 100, 200, 50])
    assert part_groups(tokens, 0) == [[0], [1, 2], [3]]  # at most the longest group's 300
    assert part_groups(tokens, 400) == [[0, 1], [2, 3]]
    assert part_groups(tokens, 650) == [[0, 1, 2, 3]]
    assert part_groups(torch.tensor([0, 5, 0]), 1) == [[0, 1, 2]]  # no part without tokens
    assert part_groups(torch.tensor([0, 0]), 0) == [[0, 1]]
    assert part_groups(torch.tensor([7]), 0) == [[0]]
