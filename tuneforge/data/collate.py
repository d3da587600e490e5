"""Batching: pad tokenized examples to a common length (right padding)."""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX

TASK_ID = "task_id"
"""An example's task: the index of its dataset's name in `dataset:` (set by load_datasets with
`multitask: true`)."""
SIDE_KEYS = ("task_ids",)
"""Batch keys that are side information for the adapters (their methods' `batch_context` reads them),
never inputs of the model: `task_ids`, each token's task, shaped like input_ids."""


def task_ids(examples: list[dict], lengths: list[int], shape: tuple[int, ...] | None) -> torch.Tensor:
    """The `task_ids` of a batch: each example's TASK_ID repeated over `lengths[i]` tokens, either
    as rows of `shape` (padded: a row's padding takes its example's task) or concatenated (packed)."""
    if shape is None:
        return torch.cat([torch.full((n,), e[TASK_ID], dtype=torch.long) for e, n in zip(examples, lengths)])[None]
    out = torch.empty(shape, dtype=torch.long)
    for row, example in enumerate(examples):
        out[row] = example[TASK_ID]
    return out


def pad_id(pad_token_id: int | None) -> int:
    """The pad token id a collator pads with; ValueError when the tokenizer has none."""
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: give the tokenizer a pad token (e.g. its eos token)")
    return pad_token_id


class PaddingCollator:
    """Turn a list of {"input_ids", "labels"} examples into padded LongTensors.

    Padded positions get `pad_token_id` in input_ids, 0 in attention_mask and `label_pad_id` in labels;
    examples that carry a task id (multi-task data) also give `task_ids`, shaped like input_ids.
    """

    def __init__(self, pad_token_id: int, label_pad_id: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None):
        pad_id(pad_token_id)
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), self.label_pad_id, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            if len(example["labels"]) != n:
                raise ValueError(f"example {row}: {n} input_ids but {len(example['labels'])} labels")
            input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(example["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if TASK_ID in examples[0]:  # multi-task data: each row's task, per token
            batch["task_ids"] = task_ids(examples, [], tuple(input_ids.shape))
        return batch
