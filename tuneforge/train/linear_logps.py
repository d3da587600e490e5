"""Per-token log-probabilities of an output head, fused and chunked: log_softmax(head(hidden))
at the target tokens without keeping the (tokens x vocabulary) logits for backward.

The stages that score replies (dpo, kto) need log p(target | position) per labelled token. The
plain way keeps the logits (and makes as many again for their gradient): with a 49k vocabulary,
800 scored tokens hold 160 MB of fp32 logits, a 152k vocabulary three times that. Here each chunk
of rows computes its logits, their log-sum-exp and the picked logit, and, when gradients are
wanted, d logp / d hidden = (onehot - softmax) @ W (tokens x hidden, small), since the gradient of
a token's log-prob with respect to its logits is onehot - softmax. Backward scales those rows by
the incoming gradient: the head's matmuls run as often as in the plain path (forward, and one for
the gradient) and nothing is recomputed. Only for a head whose weight and bias are frozen (LoRA and
the other adapters train beside it); a trained head keeps the plain path (train/logps.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype, chunk_rows, want_grad):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.size(0), chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            y = targets[start:start + chunk_rows]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            out[start:start + chunk_rows] = logits.gather(1, y.unsqueeze(1)).squeeze(1) - lse
            if jacobian is None:
                continue
            grad = logits.sub_(lse.unsqueeze(1)).exp_().neg_()  # -softmax, in the logits' memory
            grad[torch.arange(y.numel(), device=y.device), y] += 1.0  # onehot - softmax
            jacobian[start:start + chunk_rows] = (grad.to(compute_dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(jacobian if jacobian is not None else torch.empty(0))
        ctx.has_jacobian = jacobian is not None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (jacobian,) = ctx.saved_tensors
        grad_hidden = (jacobian * grad_output.unsqueeze(1).to(jacobian.dtype)) if ctx.has_jacobian else None
        return grad_hidden, None, None, None, None, None, None


def frozen_linear(head) -> bool:
    """Whether `head` is a plain Linear whose weight and bias take no gradient."""
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


def linear_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
                 chunk_rows: int | None = None) -> torch.Tensor:
    """(rows,) fp32 log_softmax(head(hidden))[row, targets[row]] for hidden (rows, hidden size)
    and targets (rows,) token ids, the head frozen (frozen_linear). Under autocast the matmuls
    run in its dtype. Raises ValueError for a head that takes gradients."""
    if not frozen_linear(head):
        raise ValueError("linear_logps needs a plain Linear head whose weight and bias are frozen")
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) \
        if torch.is_autocast_enabled(device_type) else hidden.dtype
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * head.out_features))
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    with torch.autocast(device_type, enabled=False):
        return _LinearLogps.apply(hidden, head.weight, head.bias, targets, compute_dtype, chunk_rows, want_grad)
