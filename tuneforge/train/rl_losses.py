"""The maths of the stages that learn from sampled completions (grpo, ppo): small functions of
rewards, log-probabilities and masks. Shapes: N completions, T completion tokens; masks are 1 on
the real completion tokens."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath): rewards (N,) in groups
    of `group` consecutive completions of one prompt -> (r - mean of its group) / (std of its
    group + eps), the std unbiased as TRL computes it; `scale` False leaves out the division
    (Dr. GRPO). A group of equal rewards has zero advantages. Returns (N,)."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate to the reference (Schulman's k3, as GRPO uses it):
    exp(ref - logp) - (ref - logp) - 1, >= 0. Shapes (N, T)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon: float) -> torch.Tensor:
    """PPO's clipped policy objective, per token, as a loss (Schulman et al. 2017):
    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logps - old_logps).
    logps, old_logps (N, T); advantages (N,) (one per completion) or (N, T). Returns (N, T)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              loss_type: str = "grpo", max_completion_length: int | None = None) -> torch.Tensor:
    """GRPO's loss per completion (N,), to be summed and divided by the number of completions:
    the clipped surrogate plus beta x the k3 KL per token, then
    - loss_type grpo: averaged over each completion's tokens (TRL's "grpo": the mean over
      completions of their per-token mean);
    - dr_grpo: summed over its tokens and divided by max_completion_length (Liu et al. 2025,
      TRL's "dr_grpo": no length bias).
    logps, old_logps, ref_logps, mask (N, T); advantages (N,)."""
    per_token = clipped_surrogate(logps, old_logps, advantages, epsilon)
    if beta:
        per_token = per_token + beta * k3_kl(logps, ref_logps)
    mask = mask.to(per_token.dtype)
    summed = (per_token * mask).sum(-1)
    if loss_type == "grpo":
        return summed / mask.sum(-1).clamp(min=1.0)
    if loss_type == "dr_grpo":
        return summed / max_completion_length
    raise ValueError(f"unknown loss_type {loss_type!r}")
