"""Preference losses, each a small function of log-probabilities (torchtune's style): no model,
no batch layout, one loss value per pair (shape (pairs,)), so that a stage sums or averages
them as it likes. Log-probabilities are of the reply tokens given the prompt, summed over the
reply or averaged per reply token, as each loss's docstring says; all tensors are (pairs,).

- sigmoid: DPO, Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290.
- hinge: SLiC-style hinge on the DPO log-ratio margin (Zhao et al. 2023, arXiv:2305.10425).
- ipo: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036, eq. 17.
- orpo: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691, eqs. 4-7.
- simpo: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward", arXiv:2405.14734, eq. 6.
- kto: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
  arXiv:2402.01306, eq. 8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_HALF = -math.log(2.0)


def dpo_sigmoid(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                beta: float) -> torch.Tensor:
    """-log sigmoid(beta (chosen - rejected)). Log-ratios: policy minus reference log-prob of
    each reply, summed over its tokens."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def dpo_hinge(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
              beta: float) -> torch.Tensor:
    """max(0, 1 - beta (chosen - rejected)), on summed log-ratios as dpo_sigmoid."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
        beta: float) -> torch.Tensor:
    """(chosen - rejected - 1 / (2 beta))^2 on log-ratios averaged per reply token (beta is the
    paper's tau; the per-token average is what the IPO authors and TRL use)."""
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2, with finite gradients in
    the branch not taken (x is clamped just below 0: a probability of 1 has no odds)."""
    x = x.clamp(max=-1e-7)
    small = torch.log1p(-torch.exp(torch.minimum(x, torch.full_like(x, _LOG_HALF))))
    large = torch.log(-torch.expm1(torch.maximum(x, torch.full_like(x, _LOG_HALF))))
    return torch.where(x < _LOG_HALF, small, large)


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(chosen) - log odds(rejected), odds(y) = P(y) / (1 - P(y)), on log-probs
    averaged per reply token."""
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


def orpo(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
         beta: float) -> torch.Tensor:
    """ORPO: the chosen reply's per-token NLL plus beta times -log sigmoid(log odds ratio)
    (the paper's lambda is beta), as LLaMA-Factory's pref_loss: orpo. Averaged log-probs."""
    odds = -F.logsigmoid(orpo_log_odds(chosen_avg_logps, rejected_avg_logps))
    return -chosen_avg_logps + beta * odds


def simpo(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float,
          gamma: float) -> torch.Tensor:
    """-log sigmoid(beta (chosen - rejected) - gamma), on log-probs averaged per reply token
    (the length-normalised reward beta * avg log-prob, margin gamma); no reference."""
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def kto(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO, one value per example (shape (examples,)): desirable examples (desirable True)
    lose w_d (1 - sigmoid(beta (logratio - KL))), undesirable ones w_u (1 - sigmoid(beta (KL -
    logratio))). logratios: policy minus reference log-prob of each completion, summed over its
    tokens; kl: a scalar estimate of KL(policy || reference), detached and clamped at 0 (the
    paper's z_0, estimated from mismatched prompt/completion pairs)."""
    kl = kl.detach().clamp(min=0)
    gain = 1 - torch.sigmoid(beta * (logratios - kl))
    loss = 1 - torch.sigmoid(beta * (kl - logratios))
    return torch.where(desirable, desirable_weight * gain, undesirable_weight * loss)
