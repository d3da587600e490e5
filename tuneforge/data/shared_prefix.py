"""Shared-prefix rows for the stages that score several replies to one prompt (dpo): every pair
of a micro-batch in one padding-free row, the prompt once and its replies after it,

    [prompt_1 | chosen_1 | rejected_1 | prompt_2 | chosen_2 | rejected_2 | ...]

with position_ids that restart each reply after its prompt, and a boolean attention mask in
which every token sees its own prompt and the earlier tokens of its own reply only (a rejected
reply never sees the chosen one). Each reply then gets the hidden states it would get in its own
row [prompt | reply], so its log-probability is the padded batch's, while the prompt is run once
instead of twice and no padding is computed. The mask is what train/packed_attention.py reads
(causal_segments) to run attention segment by segment.

The batch also says which positions score which token: score_from[i] is the row position whose
output predicts score_target[i], the i-th labelled reply token, of sequence score_row[i] (pair k's
chosen reply is sequence k, its rejected reply n + k, as in the padded batch's rows). The first
token of a rejected reply is predicted from the prompt's last position, not from the chosen
reply's last one."""

from __future__ import annotations

import torch

from ..train.packed_attention import segment_mask

#: keys of a shared-prefix batch (all tensors; `pairs` is 0-dimensional)
KEYS = ("input_ids", "position_ids", "attention_mask", "score_from", "score_target", "score_row", "pairs")


class SharedPrefixCollator:
    """Pair examples ({"chosen_ids", "rejected_ids", "prompt_len"}, data/pairwise.py) -> one
    shared-prefix row: input_ids and position_ids (1, L), attention_mask (1, 1, L, L) boolean,
    score_from / score_target / score_row (N,) for the N labelled reply tokens, pairs ()."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        n = len(examples)
        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int, int, int]] = []
        score_from: list[int] = []
        score_target: list[int] = []
        score_row: list[int] = []
        for k, example in enumerate(examples):
            p = example["prompt_len"]
            prompt = example["chosen_ids"][:p]
            if example["rejected_ids"][:p] != prompt:
                raise ValueError(f"pair {k}: the chosen and rejected sequences do not share their first "
                                 f"{p} tokens (prompt_len)")
            start = len(ids)
            ids += prompt
            positions += range(p)
            for row, reply in ((k, example["chosen_ids"][p:]), (n + k, example["rejected_ids"][p:])):
                at = len(ids)
                # the chosen reply continues the prompt's causal segment; the rejected one is a
                # segment of its own with the prompt as its prefix
                segments.append((start, start, start, at + len(reply)) if row == k
                                else (start, start + p, at, at + len(reply)))
                ids += reply
                positions += range(p, p + len(reply))
                for j, token in enumerate(reply):
                    before = at + j - 1 if j else start + p - 1  # the prompt's last position
                    if before < start:  # no prompt: the first token has nothing to predict it
                        continue
                    score_from.append(before)
                    score_target.append(token)
                    score_row.append(row)
        length = len(ids)
        return {"input_ids": torch.tensor([ids], dtype=torch.long),
                "position_ids": torch.tensor([positions], dtype=torch.long),
                "attention_mask": segment_mask(segments, length)[None, None],
                "score_from": torch.tensor(score_from, dtype=torch.long),
                "score_target": torch.tensor(score_target, dtype=torch.long),
                "score_row": torch.tensor(score_row, dtype=torch.long),
                "pairs": torch.tensor(n)}
