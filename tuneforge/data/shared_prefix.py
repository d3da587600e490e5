"""Shared-prefix rows for the stages that score replies to prompts (dpo, kto): every prompt of a
micro-batch once, in one padding-free row, with its replies after it,

    [prompt_1 | chosen_1 | rejected_1 | prompt_2 | chosen_2 | rejected_2 | ...]

with position_ids that restart each reply after its prompt, and a boolean attention mask in
which every token sees (the start of) its own prompt and the earlier tokens of its own reply
only (a rejected reply never sees the chosen one). Each reply then gets the hidden states it
would get in its own row [prompt | reply], so its log-probability is the padded batch's, while
the prompt runs once instead of once per reply and no padding is computed. The mask is what
train/packed_attention.py reads (causal_segments) to run attention segment by segment.

The batch also says which positions score which token: score_from[i] is the row position whose
output predicts score_target[i], the i-th reply token, of sequence score_row[i]; reply j of
prompt k is sequence j * n + k (n prompts), so a pair's chosen reply is sequence k and its
rejected one n + k, as in the padded batch's rows. The first token of a later reply is
predicted from the last prompt position it sees, not from the reply before it.

select_groups takes some of a micro-batch's prompts with their replies (pairs, kto examples)
out of its rows, shared-prefix or padded, as rows of the same layout (Objective.split)."""

from __future__ import annotations

import torch

from ..train.packed_attention import segment_mask
from .encode import split_budget

#: a prompt, and its replies as (how many prompt tokens the reply sees, the reply's tokens)
Group = tuple[list[int], list[tuple[int, list[int]]]]


class _Row:
    """What one padding-free row is built from: token ids, position_ids, attention segments
    (prefix_start, prefix_end, start, end: packed_attention.causal_segments) and the scored tokens."""

    def __init__(self):
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.segments: list[tuple[int, int, int, int]] = []
        self.score_from: list[int] = []
        self.score_target: list[int] = []
        self.score_row: list[int] = []

    def score(self, before: int, token: int, sequence: int) -> None:
        """Position `before` predicts `token` of sequence `sequence`."""
        self.score_from.append(before)
        self.score_target.append(token)
        self.score_row.append(sequence)

    def tensors(self, mask: torch.Tensor, sequences: int, prefix: str, **extra) -> dict[str, torch.Tensor]:
        """The row's keys (shared_prefix_rows), each named with `prefix`, and `extra` ones."""
        out = {"input_ids": torch.tensor([self.ids], dtype=torch.long),
               "position_ids": torch.tensor([self.positions], dtype=torch.long),
               "attention_mask": mask[None, None],
               "score_from": torch.tensor(self.score_from, dtype=torch.long),
               "score_target": torch.tensor(self.score_target, dtype=torch.long),
               "score_row": torch.tensor(self.score_row, dtype=torch.long),
               "sequences": torch.tensor(sequences), **extra}
        return {f"{prefix}{key}": value for key, value in out.items()}


def shared_prefix_rows(groups: list[Group], prefix: str = "") -> dict[str, torch.Tensor]:
    """One shared-prefix row of `groups` (each with the same number r of replies):
    {prefix}input_ids and {prefix}position_ids (1, L), {prefix}attention_mask (1, 1, L, L)
    boolean, {prefix}score_from / score_target / score_row (N,) for the N scored reply tokens,
    and {prefix}sequences () = n x r. Raises ValueError for no groups or a reply that sees more
    prompt than there is."""
    if not groups:
        raise ValueError("cannot collate an empty list of examples")
    n = len(groups)
    row = _Row()
    ids, positions, segments = row.ids, row.positions, row.segments
    for k, (prompt, replies) in enumerate(groups):
        start = len(ids)
        ids += prompt
        positions += range(len(prompt))
        segments.append((start, start, start, len(ids)))
        for j, (seen, reply) in enumerate(replies):
            if not 0 <= seen <= len(prompt):
                raise ValueError(f"prompt {k}: reply {j} sees {seen} prompt tokens of {len(prompt)}")
            at = len(ids)
            if j == 0 and seen == len(prompt):  # the first reply continues its prompt's segment
                segments[-1] = (start, start, start, at + len(reply))
            else:  # a segment of its own, with the prompt's start as its prefix
                segments.append((start, start + seen, at, at + len(reply)))
            ids += reply
            positions += range(seen, seen + len(reply))
            for t, token in enumerate(reply):
                before = at + t - 1 if t else start + seen - 1
                if before < start or (t == 0 and seen == 0):  # nothing before it to predict it
                    continue
                row.score(before, token, j * n + k)
    mask = segment_mask([s for s in segments if s[3] > s[2]], len(ids))
    return row.tensors(mask, n * len(groups[0][1]), prefix)


def continuation_rows(replies: list[tuple[list[int], int, list[int]]], prompt_starts: list[int], offset: int,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """One row of replies to prompts that another row of length `offset` already ran, for a
    forward that attends to that row's recorded keys and values (train/prompt_cache.py).

    replies[k] = (prompt, seen, reply): reply k continues the first `seen` tokens of `prompt`,
    which starts at position prompt_starts[k] of the other row. Its part of this row is the
    prompt's last seen token (so that the reply's first token gets its prediction here) and the
    reply, at positions seen - 1, seen, ...; it attends to the other row's
    [prompt_starts[k], prompt_starts[k] + seen - 1) and causally to itself. Keys as
    shared_prefix_rows gives them (input_ids, position_ids (1, L), attention_mask (1, 1, L, L): the
    row's own block-causal part, score_from / score_target / score_row (N,), sequences ()), and
    segments (m, 4): (prefix_start, prefix_end, start, end) in the other row's positions followed
    by this row's (offset + i). Raises ValueError for seen outside [0, len(prompt)]."""
    row = _Row()
    ids, positions, segments = row.ids, row.positions, row.segments
    for k, ((prompt, seen, reply), start) in enumerate(zip(replies, prompt_starts)):
        if not 0 <= seen <= len(prompt):
            raise ValueError(f"reply {k} sees {seen} prompt tokens of {len(prompt)}")
        at = len(ids)
        head = prompt[seen - 1:seen]  # the last prompt token it sees (none when it sees none)
        ids += head + reply
        positions += range(seen - len(head), seen + len(reply))
        if len(ids) > at:
            p0, p1 = (start, start + seen - 1) if seen > 1 else (offset + at, offset + at)
            segments.append((p0, p1, offset + at, offset + len(ids)))
        for t, token in enumerate(reply):
            if not head and t == 0:  # nothing before it to predict it
                continue
            row.score(at + t - 1 + len(head), token, k)
    mask = segment_mask([(s - offset, s - offset, s - offset, e - offset) for _, _, s, e in segments], len(ids))
    return row.tensors(mask, len(replies), prefix, segments=torch.tensor(segments, dtype=torch.long).reshape(-1, 4))


class SharedPrefixCollator:
    """Pair examples ({"chosen_ids", "rejected_ids", "prompt_len"}, data/pairwise.py) -> one
    shared-prefix row (shared_prefix_rows): each prompt, then its chosen and rejected reply."""

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        groups = []
        for k, example in enumerate(examples):
            p = example["prompt_len"]
            prompt = example["chosen_ids"][:p]
            if example["rejected_ids"][:p] != prompt:
                raise ValueError(f"pair {k}: the chosen and rejected sequences do not share their first "
                                 f"{p} tokens (prompt_len)")
            groups.append((prompt, [(p, example["chosen_ids"][p:]), (p, example["rejected_ids"][p:])]))
        return shared_prefix_rows(groups)


class KtoSharedCollator:
    """Feedback examples ({"input_ids", "prompt_len", "kto_tag", "kl_reply"}, data/kto.py) -> the
    rows stage: kto runs, each padding-free: prompt + reply of every example, and ("kl_") prompt +
    kl_reply within cutoff_len as data.kto.KtoCollator cuts it; and kto_tag. The policy and the
    reference score the same rows, so before training (policy = reference) their log-ratios are
    exactly 0 in any precision."""

    def __init__(self, cutoff_len: int):
        self.cutoff_len = cutoff_len

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        main, kl, continued, starts = [], [], [], []
        length = 0
        for e in examples:
            p = e["prompt_len"]
            seen, keep = split_budget(p, len(e["kl_reply"]), self.cutoff_len)
            main.append((e["input_ids"][:p], [(p, e["input_ids"][p:])]))
            kl.append((e["input_ids"][:seen], [(seen, e["kl_reply"][:keep])]))
            continued.append((e["input_ids"][:p], seen, e["kl_reply"][:keep]))
            starts.append(length)
            length += len(e["input_ids"])
        return {**shared_prefix_rows(main), **shared_prefix_rows(kl, "kl_"),
                **continuation_rows(continued, starts, length, "klc_"),
                "kto_tag": torch.tensor([e["kto_tag"] for e in examples], dtype=torch.long)}


# ---- some of a micro-batch's examples, in its own layout (Objective.split: stages dpo and kto) --
PADDED = ("input_ids", "attention_mask", "labels")  # a padded row set's keys


def is_shared_prefix(rows: dict, prefix: str = "") -> bool:
    """Whether `rows` are a shared-prefix row (shared_prefix_rows), not padded rows."""
    return f"{prefix}score_from" in rows


def group_tokens(rows: dict, n: int, prefix: str = "") -> torch.Tensor:
    """(n,) the tokens each of the n groups of `rows` puts through a forward: a shared-prefix
    row's prompt k with its replies (a span no reply token is scored in counts for none), or a
    padded batch's rows k, n + k, ... (its real tokens). See select_groups."""
    if is_shared_prefix(rows, prefix):
        owner = position_groups(rows, n, prefix)
        return torch.bincount(owner[owner >= 0], minlength=n)[:n]
    mask = rows[f"{prefix}attention_mask"]
    return mask.sum(1).view(-1, n).sum(0)


def position_groups(rows: dict, n: int, prefix: str = "") -> torch.Tensor:
    """(L,) for each position of a shared-prefix row, the group (prompt) k in 0..n-1 it belongs
    to, -1 for a span that no scored token reads. The row falls into blocks where no later
    position sees an earlier one (its attention_mask); a block belongs to the group of the
    sequences scored in it (score_row j * n + k: group k). Raises ValueError for a block in
    which replies of two groups are scored (not a shared_prefix_rows layout)."""
    mask = rows[f"{prefix}attention_mask"][0, 0]
    length = mask.size(0)
    if length == 0:
        return torch.zeros(0, dtype=torch.long)
    first = mask.to(torch.uint8).argmax(1)  # the earliest position each position sees
    starts = first.flip(0).cummin(0).values.flip(0) >= torch.arange(length, device=first.device)
    block = starts.cumsum(0) - 1
    owner = torch.full((int(block[-1]) + 1,), -1, dtype=torch.long, device=block.device)
    scored_block, scored_group = block[rows[f"{prefix}score_from"]], rows[f"{prefix}score_row"] % n
    owner[scored_block] = scored_group
    if bool((owner[scored_block] != scored_group).any()):
        raise ValueError(f"a block of the shared-prefix row ({prefix}attention_mask) scores replies of two prompts")
    return owner[block]


def select_groups(rows: dict, groups: list[int], n: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """The rows of some of a micro-batch's n groups, in its layout, keys without `prefix`.

    A group is a prompt and its r replies (sequences k, n + k, ..., (r - 1) n + k: stage dpo's
    pair k, stage kto's example k). Shared-prefix rows (shared_prefix_rows): the group's spans of
    the row (position_groups), the mask between them, score_from re-based onto the shorter row
    and score_row renumbered j * len(groups) + (k's index in `groups`); a span no reply token is
    scored in is left out (it changes no log-prob). Padded rows (input_ids, attention_mask,
    labels): rows j * n + k, then as many columns as the widest of them has tokens. Either way
    reply_logps gives sequence j * len(groups) + i the log-prob of sequence j * n + groups[i]."""
    pick = torch.as_tensor(groups, dtype=torch.long)
    if is_shared_prefix(rows, prefix):
        owner = position_groups(rows, n, prefix)
        keep = torch.isin(owner, pick.to(owner.device))
        at = keep.nonzero().squeeze(1)
        moved = keep.cumsum(0) - 1  # old position -> new position, for the kept ones
        score_row = rows[f"{prefix}score_row"]
        scored = torch.isin(score_row % n, pick.to(score_row.device))
        index = torch.full((n,), -1, dtype=torch.long, device=score_row.device)
        index[pick.to(score_row.device)] = torch.arange(len(groups), device=score_row.device)
        row = score_row[scored]
        replies = int(rows[f"{prefix}sequences"]) // n
        out = {k: rows[f"{prefix}{k}"][:, at] for k in ("input_ids", "position_ids")}
        mask = rows[f"{prefix}attention_mask"][0, 0]
        out.update(attention_mask=mask[at][:, at][None, None],
                   score_from=moved[rows[f"{prefix}score_from"][scored]],
                   score_target=rows[f"{prefix}score_target"][scored],
                   score_row=(row // n) * len(groups) + index[row % n],
                   sequences=torch.tensor(len(groups) * replies))
        return out
    replies = rows[f"{prefix}input_ids"].size(0) // n
    at = torch.cat([pick + j * n for j in range(replies)]).to(rows[f"{prefix}input_ids"].device)
    real = rows[f"{prefix}attention_mask"][at].bool().any(0).nonzero()
    width = int(real.max()) + 1 if real.numel() else 1
    return {k: rows[f"{prefix}{k}"][at, :width] for k in PADDED if f"{prefix}{k}" in rows}
