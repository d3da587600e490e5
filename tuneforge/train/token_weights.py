"""Per-token weights of the SFT cross-entropy, LLaMA-Factory's `use_dft_loss` and `use_eaft_loss`.

Each function maps (logits (tokens, vocab) fp32, cross-entropies (tokens,)) to weights (tokens,),
computed without gradient: the loss is sum_t w_t * CE_t, so a token's gradient is its plain
cross-entropy gradient scaled by w_t (train/fused_loss.py applies it chunk by chunk, never holding
all logits). The sum is divided by the label count, as the plain loss is.

- DFT, Dynamic Fine-Tuning (Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning
  Perspective with Reward Rectification"): w_t = p(y_t), the model's probability of the label token.
- EAFT, entropy-adaptive weighting as LLaMA-Factory implements it: w_t = (H_t / 3) ** alpha, with H_t
  the entropy of the softmax over the 20 largest logits."""

from __future__ import annotations

import torch

EAFT_TOP_K = 20
EAFT_SCALE = 3.0


def dft_weight(logits: torch.Tensor, cross_entropy: torch.Tensor) -> torch.Tensor:
    """p(label) = exp(-CE), per token."""
    return torch.exp(-cross_entropy.detach())


def eaft_weight(alpha: float):
    """The EAFT weight with exponent `alpha` (LLaMA-Factory's eaft_alpha)."""
    def weight(logits: torch.Tensor, cross_entropy: torch.Tensor) -> torch.Tensor:
        top = torch.topk(logits.detach(), k=min(EAFT_TOP_K, logits.size(-1)), dim=-1).values
        logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
        entropy = -(logp.exp() * logp).sum(-1)
        return torch.pow(entropy / EAFT_SCALE, alpha)
    return weight


def token_weight(settings: dict):
    """The weight function the sft settings ask for (use_dft_loss, use_eaft_loss, eaft_alpha), or
    None. Both set is refused by config_checks before training."""
    if settings.get("use_dft_loss"):
        return dft_weight
    if settings.get("use_eaft_loss"):
        return eaft_weight(settings.get("eaft_alpha", 1.0))
    return None
