"""Sequence log-probabilities for the stages that score whole replies (dpo, kto): for each row
of a right-padded batch with labels (-100 on the prompt and the padding), the sum of the
log-probabilities of its labelled tokens and their count, from one forward over all rows; or
the same per sequence of a shared-prefix row (data/shared_prefix.py: the prompt once, its replies
after it, and which position scores which token).

Where the model's logits are `head(hidden states)` (fused_loss.probe), the output head runs only
at the labelled positions: the prompt's (tokens x vocabulary) logits are never made; and where
that head is frozen, in chunks whose logits are not kept (train/linear_logps.py)."""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from .fused_loss import head_as_identity, probe
from .linear_logps import frozen_linear, linear_logps

IGNORE = -100
PROBE_TOKENS = 16


def head_only_at_labels(unwrapped, sample_batch: dict, autocast=nullcontext) -> bool:
    """Whether `reply_logps` may run the output head at the labelled positions only (a quick
    check of the model's logits against head(hidden) on the start of the first row)."""
    inputs = {k: v[:1, :PROBE_TOKENS] for k, v in sample_batch.items()
              if k == "input_ids" or (k == "attention_mask" and v.dim() == 2)}
    with autocast():
        return probe(unwrapped, inputs) is None


def reply_logps(model, unwrapped, batch: dict, head_at_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, counts), both (sequences,): the summed fp32 log-probability of each sequence's
    labelled tokens and how many there are. A padded batch's sequences are its rows (next-token:
    the label at position t is predicted from position t - 1); a shared-prefix batch's are
    numbered by its score_row (the position score_from[i] predicts score_target[i]). `model` runs
    the forward (maybe wrapped for distributed training); `unwrapped` is the model itself, whose
    head is swapped out when `head_at_labels`."""
    shared = "score_from" in batch
    keys = ("input_ids", "position_ids", "attention_mask") if shared else ("input_ids", "attention_mask")
    inputs = {k: batch[k] for k in keys}
    if "use_cache" in inspect.signature(unwrapped.forward).parameters:
        inputs["use_cache"] = False
    if shared:
        rows, targets = batch["score_row"], batch["score_target"]
        sequences = int(batch["sequences"])
        pick = (0, batch["score_from"])
    else:
        shifted = batch["labels"][:, 1:]
        keep = shifted != IGNORE
        rows, targets = keep.nonzero()[:, 0], shifted[keep]
        sequences = keep.size(0)
    if head_at_labels:
        with head_as_identity(unwrapped) as head:
            out = model(**inputs).logits
        hidden = out[pick] if shared else out[:, :-1][keep]
        if frozen_linear(head):  # chunked: the logits are never kept (train/linear_logps.py)
            token_logps = linear_logps(hidden, head, targets)
        else:
            token_logps = _picked_logps(head(hidden), targets)
    else:
        out = model(**inputs).logits
        token_logps = _picked_logps(out[pick] if shared else out[:, :-1][keep], targets)
    logps = torch.zeros(sequences, dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)
    if rows.numel() == 0:  # no labelled token: zeros that still depend on the graph
        logps = logps + out.sum().float() * 0.0
    return logps, torch.bincount(rows, minlength=sequences)


def _picked_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
