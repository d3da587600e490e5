"""PackingCollator: one padding-free row per micro-batch, positions restarting per example,
the first label of every example ignored, no attention_mask."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data import IGNORE_INDEX, PackingCollator, PaddingCollator


def _examples():
    return [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
            {"input_ids": [8, 9], "labels": [8, 9]},
            {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4]}]


def test_examples_become_one_row_with_restarting_positions():
    batch = PackingCollator()(_examples())
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: no padding
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # each example's first label is ignored: it would be predicted from the previous example
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 3, 4]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_the_loss_sees_the_same_label_tokens_as_the_padded_batch():
    """The loop predicts labels[:, 1:]; packed and padded batches then score the same tokens."""
    packed = PackingCollator()(_examples())
    padded = PaddingCollator(pad_token_id=0)(_examples())

    def scored(batch):
        ids, labels = batch["input_ids"][:, :-1], batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        # (previous token, label) pairs: what each loss term conditions on and predicts
        return sorted(zip(ids[keep].tolist(), labels[keep].tolist()))

    assert scored(packed) == scored(padded)
    assert packed["input_ids"].numel() == int(padded["attention_mask"].sum())


def test_empty_examples_are_skipped_and_bad_input_is_named():
    batch = PackingCollator()([{"input_ids": [], "labels": []}, {"input_ids": [3], "labels": [3]}])
    assert batch["input_ids"].tolist() == [[3]] and batch["labels"].tolist() == [[-100]]
    with pytest.raises(ValueError, match="example 0: 2 input_ids but 1 labels"):
        PackingCollator()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="empty list"):
        PackingCollator()([])
