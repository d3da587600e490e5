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


# -- PPO (Schulman et al. 2017; as TRL 0.x's PPOTrainer runs it for LLaMA-Factory) -----------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where mask is 1 (a scalar)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries, the variance unbiased; with
    shift_mean False the mean is added back (only the scale changes). Shapes (N, T)."""
    mean = masked_mean(values, mask)
    centred = values - mean
    count = mask.sum()
    var = masked_mean(centred ** 2, mask) * (count / (count - 1).clamp(min=1))
    whitened = centred * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (N, T): -kl_coef x (logp - ref_logp) on every completion token, plus the
    sequence's score (N,) on its last token; and the per-token KL estimate logp - ref_logp."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95, whiten_rewards: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the completion tokens:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1} (0 after the end);
    returns = A + V; the advantages are then whitened over the masked tokens. With
    whiten_rewards the rewards are first scaled to unit variance (their mean kept).
    rewards, values, mask (N, T) -> (advantages, returns), both (N, T), without gradient."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, last = torch.zeros_like(values), torch.zeros_like(values[:, 0])
    width = values.size(1)
    for t in reversed(range(width)):
        following = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    returns = advantages + values
    return masked_whiten(advantages, mask).detach(), returns.detach()


def ppo_loss(logps, old_logps, advantages, values, old_values, returns, mask, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1) -> tuple[torch.Tensor, dict]:
    """PPO's loss over a minibatch: the clipped policy loss, masked mean of
    max(-A ratio, -A clip(ratio, 1 - c, 1 + c)), plus vf_coef x the clipped value loss, 0.5 x
    masked mean of max((V - R)^2, (clip(V, V_old - cv, V_old + cv) - R)^2). All (N, T).
    Returns (loss, {"pg_loss", "vf_loss", "clipfrac"} floats)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    pg = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)), mask)
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
    return pg + vf_coef * vf, {"pg_loss": pg.item(), "vf_loss": vf.item(), "clipfrac": clipfrac.item()}


class AdaptiveKL:
    """The adaptive KL coefficient (Ziegler et al. 2019): after each rollout of n sequences whose
    mean KL is `kl`, coef *= 1 + clip(kl / target - 1, -0.2, 0.2) x n / horizon. target None:
    a fixed coefficient."""

    def __init__(self, coef: float, target: float | None, horizon: int = 10000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon


class RunningMoments:
    """The running mean and std of all scores seen (Chan et al.'s parallel update): for
    ppo_score_norm, scores -> (scores - mean) / (std + eps) with the moments after the update."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def normalise(self, scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        n = scores.numel()
        batch_mean, batch_var = scores.mean().item(), scores.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total
        std = (self.var * total / max(total - 1, 1)) ** 0.5
        return (scores - self.mean) / (std + eps)
