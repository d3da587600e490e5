"""A training micro-batch of a next-token stage (sft, pt) as parts, one forward and backward each
(the loop's Objective.split), so only one part's activations are alive at a time.

Exact, because each example's loss reads only its own tokens:
- padded rows (data/collate.py PaddingCollator): a causal language model's row never attends to
  another row, and a row's real tokens never attend to the padding after them; a part takes whole
  rows and keeps the columns up to its longest row's last real or labelled position, so it drops
  only padding that carries no label;
- a packed row (data/packing.py PackingCollator): examples concatenated, position_ids restarting
  at 0 (attention stays within an example) and each example's first label ignored, so no loss
  term spans two examples; a part is a run of whole examples, cut where position_ids are 0 and the
  label is ignored, with its position_ids still starting at 0.
Every tensor of the batch shaped like input_ids (labels, attention_mask, position_ids, task_ids
of multi-task data: data.collate.SIDE_KEYS) is cut the same way; a batch holding anything else runs
whole. The parts' label counts sum to the micro-batch's (the loop normalises by the whole step's).

Size: a part holds whole examples up to a budget of token positions (padded: rows x the part's
longest row), the run's cutoff_len (or the longest example, if longer or no budget is given): the
activations alive at a time are at most those of one example of the longest length allowed (what
train/memory_plan.py counts), with as few forwards as that allows. Fewer, longer parts are
cheaper: each forward and backward also reads every weight once more, which costs a forward of
about 40 tokens on SmolLM2-135M at one CPU thread (fp32), however few tokens the part holds.

Not split: a model whose trained adapters add a term computed from each whole forward (an
AdapterMethod's forward_loss: lora_moe's router load balance counts the forward's tokens), which
parts would change."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the stages read PART_TOKENS when they register
    import torch

IGNORE = -100


def whole_reason(model) -> str | None:
    """Why this model's micro-batches must run whole, or None when they may be split."""
    from ..adapters import training_hooks

    if training_hooks.gives(model, "forward_loss"):
        return ("an adapter method adds a term of each whole forward (e.g. lora_moe's router load balance), "
                "which parts would change")
    return None


def keep_whole(objective, model):
    """`objective` (a stages.table.Objective) for the loop to run on `model`: without its `split`
    where `whole_reason(model)` says micro-batches must run whole, so that no stage has to ask."""
    import dataclasses

    if objective.split is not None and whole_reason(model) is not None:
        return dataclasses.replace(objective, split=None)
    return objective


def plan(model, examples: int, group: int, most: int | None = None) -> tuple[int, str | None]:
    """(the most token positions one training forward holds, a log line or None) for micro-batches
    of `examples` examples (pairs) of up to `group` tokens each, split into parts of whole examples
    of up to `most` tokens (default `group`; at least one example's): what train/memory_plan.py's
    activation estimate counts."""
    whole = examples * group
    if examples <= 1:
        return whole, None
    reason = whole_reason(model)
    if reason is not None:
        return whole, f"micro-batches: run whole ({reason})"
    part = max(group if most is None else most, group)
    if part >= whole:
        return whole, None
    return part, (f"micro-batches: each runs as parts of whole examples of up to {part} tokens (of the {whole} "
                  f"a batch of {examples} can hold), one forward and backward at a time (same loss and "
                  "gradients, less memory)")


def split_batch(batch: dict, budget: int | None = None) -> list[dict]:
    """The parts of a training micro-batch (module docstring), each of at most max(budget, the
    longest example's length) token positions, or [batch] when it is one part: examples that fit
    the budget together, or a batch holding a value not shaped like input_ids, or a packed row
    without position_ids."""
    import torch

    shape = batch["input_ids"].shape
    if len(shape) != 2 or not all(torch.is_tensor(v) and v.shape == shape for v in batch.values()):
        return [batch]
    if shape[0] == 1:
        return _split_packed(batch, budget or 0)
    return _split_rows(batch, budget or 0)


#: a part of a micro-batch of stages dpo and kto runs at most this many tokens, or its one
#: longest group's (sft and pt: cutoff_len)
PART_TOKENS = 512


def part_groups(tokens: torch.Tensor, most: int | None = None) -> list[list[int]]:
    """Consecutive groups (examples, pairs) of a micro-batch as parts of at most `most` tokens
    (default PART_TOKENS; at least the longest group's): `tokens` (n,) each group's tokens
    (data/shared_prefix.py group_tokens, or a packed row's examples). A group joins the part before
    while the part stays within the bound: the peak of one part's activations is that of the
    longest group or of `most` tokens, and short groups share a forward (any two consecutive parts
    hold more than the bound). Every part has tokens unless the micro-batch has none (then it is
    one part)."""
    counts = tokens.tolist()
    most = max([PART_TOKENS if most is None else most, *counts])
    parts: list[list[int]] = [[]]
    held = 0
    for k, count in enumerate(counts):
        if parts[-1] and held + count > most:
            parts.append([])
            held = 0
        parts[-1].append(k)
        held += count
    return parts


def _split_packed(batch: dict, budget: int) -> list[dict]:
    """One row: cut between examples, into runs of whole examples."""
    import torch

    positions = batch.get("position_ids")
    if positions is None:
        return [batch]
    length = positions.shape[1]
    starts = ((positions[0] == 0) & (batch["labels"][0] == IGNORE)).nonzero().flatten().tolist()
    starts = [0] + [s for s in starts if s > 0]
    ends = starts[1:] + [length]
    groups = part_groups(torch.tensor([end - start for start, end in zip(starts, ends)]), budget)
    if len(groups) == 1:
        return [batch]
    bounds = [(starts[group[0]], ends[group[-1]]) for group in groups]
    return [{key: value[:, a:b] for key, value in batch.items()} for a, b in bounds]


def _split_rows(batch: dict, budget: int) -> list[dict]:
    """Several rows: groups of whole rows, longest first, each trimmed to its longest row."""
    import torch

    rows, width = batch["input_ids"].shape
    mask = batch.get("attention_mask")
    if mask is None:  # no padding known: rows keep their width
        lengths = [width] * rows
    else:
        used = (mask != 0) | (batch["labels"] != IGNORE)
        last = (used * torch.arange(1, width + 1, device=used.device)).amax(dim=1)
        lengths = last.clamp(min=1).tolist()
    order = sorted(range(rows), key=lambda r: -lengths[r])
    budget, groups = max(budget, lengths[order[0]]), []
    for r in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(r)
        else:
            groups.append([r])
    if len(groups) == 1:
        return [batch]
    device = batch["input_ids"].device
    parts = []
    for group in groups:
        index, keep = torch.tensor(group, device=device), lengths[group[0]]
        parts.append({key: value.index_select(0, index)[:, :keep].contiguous() for key, value in batch.items()})
    return parts
