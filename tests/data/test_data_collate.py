"""PaddingCollator: right padding, attention mask, label padding, pad_to_multiple_of."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data import PaddingCollator

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"input_ids": [8], "labels": [8]},
]


def test_right_padding_shapes_and_values():
    batch = PaddingCollator(pad_token_id=2)(EXAMPLES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_pad_to_multiple_of_and_label_pad_id():
    batch = PaddingCollator(pad_token_id=0, label_pad_id=-1, pad_to_multiple_of=4)(EXAMPLES)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[-100, 6, 7, -1], [8, -1, -1, -1]]


def test_mismatched_lengths_and_empty_batch_are_rejected():
    with pytest.raises(ValueError, match="labels"):
        PaddingCollator(0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError):
        PaddingCollator(0)([])


def test_collates_real_examples(smol, make_args, shared_data):
    from tuneforge.data import load_datasets

    train = load_datasets(make_args(dataset="alpaca_en_demo", dataset_dir=str(shared_data), max_samples=4), smol).train
    batch = PaddingCollator(smol.pad_token_id, pad_to_multiple_of=8)(train)
    lengths = [len(e["input_ids"]) for e in train]
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(lengths)
    assert batch["attention_mask"].sum(1).tolist() == lengths
