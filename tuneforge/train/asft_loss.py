"""LLaMA-Factory's ASFT loss (`use_asft_loss`, `asft_alpha`; stage sft): DFT's weighted
cross-entropy anchored to the model before training by a KL term.

Per labelled position t (the next token y_t; logits z_t of the trained model, r_t of the
reference, both over the whole vocabulary):

    loss_t = CE_t * p(y_t)  +  alpha * KL(softmax(r_t) || softmax(z_t))

with CE_t = -log softmax(z_t)[y_t], p(y_t) = exp(-CE_t) without gradient (DFT, train/token_weights.py)
and KL(q || p) = sum_v q_v (log q_v - log p_v), as LLaMA-Factory's trainer_utils.asft_loss_func
(torch's kl_div(log p, q) summed over the vocabulary). The sum over labelled positions is divided
by their count, as every token loss here (LLaMA-Factory: the mean per micro-batch).

The reference is the model before training: with an adapter (lora, ...), the same model with its
adapters disabled (`tuneforge.adapters.disable_adapters`, under torch.no_grad); with full or
freeze fine-tuning, a frozen copy made before the first step (logged; LLaMA-Factory loads a second
copy too). The logits are computed at the labelled positions only where the model takes
`logits_to_keep`; the fused cross-entropy (which never holds the logits) cannot give the KL.
"""

from __future__ import annotations

import copy
import inspect
import logging

import torch
import torch.nn.functional as F

from .token_loss import IGNORE, model_inputs

log = logging.getLogger("tuneforge")


def asft_token_losses(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """Per-position ASFT loss (positions,) from the trained model's logits and the reference's
    (positions, vocab) at labelled positions and their targets (positions,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_logp = F.log_softmax(reference.float(), dim=-1)
    kl = F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(-1)
    return ce * torch.exp(-ce.detach()) + alpha * kl


def reference_forward(unwrapped):
    """`forward(**inputs) -> logits` of the model before training, without gradient: the model
    with its adapters disabled, or (no adapter: full / freeze) a frozen copy made now."""
    from ..adapters import disable_adapters
    from ..adapters.core import get_state

    state = get_state(unwrapped)
    if state is not None and state.configs:
        def forward(**inputs):
            with torch.no_grad(), disable_adapters(unwrapped):
                return unwrapped(**inputs).logits
        return forward
    log.info("use_asft_loss: the model has no adapter to disable, so the ASFT reference is a frozen copy of it "
             "(as LLaMA-Factory loads one), which doubles the weights in memory")
    frozen = copy.deepcopy(unwrapped).requires_grad_(False).eval()

    def forward_copy(**inputs):
        with torch.no_grad():
            return frozen(**inputs).logits
    return forward_copy


class AsftLoss:
    """`loss(batch) -> (summed ASFT loss, label count)` for the training loop's objective."""

    def __init__(self, unwrapped, alpha: float):
        self.alpha = alpha
        self.reference = reference_forward(unwrapped)
        params = inspect.signature(unwrapped.forward).parameters
        self.sparse = "logits_to_keep" in params
        self.no_cache = {"use_cache": False} if "use_cache" in params else {}

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        inputs, shifted = {**model_inputs(batch), **self.no_cache}, batch["labels"][:, 1:]
        if self.sparse:  # the head only where some row has a label
            positions = (shifted != IGNORE).any(dim=0).nonzero().squeeze(-1)
            logits = model(**inputs, logits_to_keep=positions).logits
            reference = self.reference(**inputs, logits_to_keep=positions)
            shifted = shifted[:, positions]
        else:
            logits = model(**inputs).logits[:, :-1]
            reference = self.reference(**inputs)[:, :-1]
        keep = shifted != IGNORE
        losses = asft_token_losses(logits[keep], reference[keep], shifted[keep], self.alpha)
        return losses.sum(), int(keep.sum())
