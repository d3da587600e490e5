"""Distillation losses, each a small function of logits (torchtune's style): no model, no batch
layout. `student` and `teacher` are (tokens, vocab) logits at the same positions, over the same
vocabulary; each function returns one divergence per token, shape (tokens,), in fp32, so that a
stage sums or averages them as it likes. `temperature` T softens both distributions
(softmax(logits / T)) before they are compared.

- forward_kl: KL(teacher || student), the soft-target loss of Hinton, Vinyals & Dean 2015,
  "Distilling the Knowledge in a Neural Network", arXiv:1503.02531 (mean-seeking: the student
  covers all of the teacher's mass).
- reverse_kl: KL(student || teacher), MiniLLM, Gu et al. 2024, "MiniLLM: Knowledge Distillation
  of Large Language Models", arXiv:2306.08543 (mode-seeking).
- generalized_jsd: the generalised Jensen-Shannon divergence of GKD, Agarwal et al. 2024,
  "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
  arXiv:2306.13649, eq. 1: beta KL(teacher || M) + (1 - beta) KL(student || M) with the
  mixture M = beta teacher + (1 - beta) student (TRL's GKDTrainer.generalized_jsd_loss with the
  same beta; TRL's beta 0 and 1 are forward_kl and reverse_kl).

The stage's loss (kd_loss, docstring of train/stages/kd.py) is
kd_alpha * T^2 * divergence + (1 - kd_alpha) * cross-entropy: Hinton's T^2 keeps the soft
targets' gradients at the scale of the hard ones when T changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (0 log 0 = 0)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), per token."""
    return _kl(_log_probs(teacher, temperature), _log_probs(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), per token."""
    return _kl(_log_probs(student, temperature), _log_probs(teacher, temperature))


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, per token;
    0 < beta < 1 (beta 0.5: the symmetric Jensen-Shannon divergence)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalized_jsd needs 0 < beta < 1, got {beta}")
    log_s, log_t = _log_probs(student, temperature), _log_probs(teacher, temperature)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def divergence(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    """The divergence `kind` (one of KINDS) per token; beta is jsd's."""
    if kind == "forward_kl":
        return forward_kl(student, teacher, temperature)
    if kind == "reverse_kl":
        return reverse_kl(student, teacher, temperature)
    if kind == "jsd":
        return generalized_jsd(student, teacher, beta, temperature)
    raise ValueError(f"unknown distillation loss {kind!r}; one of {', '.join(KINDS)}")


def kd_token_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *, kind: str,
                  alpha: float, temperature: float, beta: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, divergence, cross-entropy), each summed over the tokens: loss = alpha T^2
    divergence + (1 - alpha) CE(student logits at T = 1, targets). targets: (tokens,) ids."""
    div = divergence(kind, student, teacher, temperature, beta)
    ce = F.cross_entropy(student.float(), targets, reduction="none")
    loss = alpha * temperature ** 2 * div.sum() + (1 - alpha) * ce.sum()
    return loss, div.sum(), ce.sum()
