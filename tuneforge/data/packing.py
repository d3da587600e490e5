"""Padding-free batches: a micro-batch's examples concatenated into one row.

The row carries position_ids that restart at 0 for every example (transformers derives the
block-diagonal causal mask from them, so attention never crosses examples) and no
attention_mask. The training loop predicts labels[:, 1:] from logits[:, :-1], so the label of
each example's first token is ignored: no loss term ever spans two examples, and the loss and
its token count equal those of the padded batch of the same examples.
"""

from __future__ import annotations

import torch

from .collate import TASK_ID, task_ids
from .encode import IGNORE_INDEX


class PackingCollator:
    """Turn a list of {"input_ids", "labels"} examples into one packed row:
    input_ids, position_ids and labels, each of shape (1, total tokens), and `task_ids` (each
    token's task) when the examples carry a task id."""

    def __init__(self, label_pad_id: int = IGNORE_INDEX):
        self.label_pad_id = label_pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        ids, positions, labels, kept = [], [], [], []
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            if len(example["labels"]) != n:
                raise ValueError(f"example {row}: {n} input_ids but "
                                 f"{len(example['labels'])} labels")
            if n == 0:
                continue  # a padded row of nothing but padding contributes nothing either
            ids.append(torch.as_tensor(example["input_ids"], dtype=torch.long))
            positions.append(torch.arange(n, dtype=torch.long))
            target = torch.as_tensor(example["labels"], dtype=torch.long).clone()
            target[0] = self.label_pad_id  # predicted from the previous example's last token
            labels.append(target)
            kept.append(example)
        if not ids:
            raise ValueError("cannot pack examples that are all empty")
        batch = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
                 "labels": torch.cat(labels)[None]}
        if TASK_ID in kept[0]:  # multi-task data: a packed row holds several tasks, so per token
            batch["task_ids"] = task_ids(kept, [len(e["input_ids"]) for e in kept], None)
        return batch
