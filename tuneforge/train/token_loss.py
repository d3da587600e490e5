"""The loss every stage built on next-token prediction shares: the sum of cross-entropies over
labelled positions and their count (the loop divides by the count of the whole optimizer step).

Three ways to compute the same number, the cheapest the model allows:
- fused: head and cross-entropy in chunks, only at labelled positions (fused_loss.py);
- sparse: the model's head only at positions some row has a label for (`logits_to_keep`);
- plain: all logits."""

from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..data.collate import SIDE_KEYS
from ..errors import ConfigError
from .fused_loss import fused_token_loss_sum, probe

IGNORE = -100
PROBE_TOKENS = 16
log = logging.getLogger("tuneforge")


def model_inputs(batch: dict) -> dict:
    """What the model gets: everything a collator made except the labels and the side
    information for adapters (data.collate.SIDE_KEYS: task_ids) (input_ids, and an
    attention_mask for padded rows or position_ids for packed ones)."""
    return {k: v for k, v in batch.items() if k != "labels" and k not in SIDE_KEYS}


def label_count(batch: dict) -> int:
    """Positions whose next token is labelled: what a token loss of `batch` is a sum over."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class TokenLoss:
    """`loss(batch) -> (summed loss, label count)`. `model` runs the forward (it may be wrapped
    for distributed training); `unwrapped` is the model itself. `token_weight`: a per-token weight
    of the cross-entropy (train/token_weights.py: DFT, EAFT), or None for plain cross-entropy."""

    def __init__(self, model, unwrapped, mode: str, token_weight=None):
        self.model, self.unwrapped, self.mode = model, unwrapped, mode
        self.token_weight = token_weight
        # transformers models build a KV cache even in training when their config says
        # use_cache; a loss never needs one
        params = inspect.signature(unwrapped.forward).parameters
        self.no_cache = {"use_cache": False} if "use_cache" in params else {}

    @classmethod
    def choose(cls, model, unwrapped, sample_batch: dict, fused: bool | None,
               autocast=nullcontext, token_weight=None) -> "TokenLoss":
        """Fused where `fused` allows it (None: where the probe passes), else sparse or plain.
        `autocast` is the training's autocast context (a bf16 base with fp32 adapters needs it)."""
        if fused is not False:
            inputs = {k: v[:1, :PROBE_TOKENS] for k, v in model_inputs(sample_batch).items()}
            with autocast():
                why_not = probe(unwrapped, inputs)
            if why_not is None:
                return cls(model, unwrapped, "fused", token_weight)
            if fused:
                raise ConfigError(f"config key 'fused_cross_entropy' is true, but {why_not}; "
                                  "set it to false or leave it empty")
            log.info("fused cross-entropy off: %s", why_not)
        return cls(model, unwrapped, "sparse" if _accepts_logits_to_keep(unwrapped) else "plain", token_weight)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, int]:
        inputs, labels = {**model_inputs(batch), **self.no_cache}, batch["labels"]
        if self.mode == "fused":
            return fused_token_loss_sum(self.model, self.unwrapped, inputs, labels, self.token_weight)
        shifted = labels[:, 1:]
        if self.mode == "sparse":
            positions = (shifted != IGNORE).any(dim=0).nonzero().squeeze(-1)
            logits = self.model(**inputs, logits_to_keep=positions).logits
            shifted = shifted[:, positions]
        else:
            logits = self.model(**inputs).logits[:, :-1]
        flat, targets = logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1)
        if self.token_weight is None:
            loss = F.cross_entropy(flat, targets, ignore_index=IGNORE, reduction="sum")
        else:
            keep = targets != IGNORE
            flat, targets = flat[keep], targets[keep]
            per_token = F.cross_entropy(flat, targets, reduction="none")
            with torch.no_grad():
                weights = self.token_weight(flat.detach(), per_token.detach())
            loss = (per_token * weights).sum()
        return loss, int((shifted != IGNORE).sum())
