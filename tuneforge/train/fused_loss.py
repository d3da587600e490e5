"""Output head and cross-entropy fused and chunked: the (tokens x vocabulary) logits never exist
in full. With a 49k vocabulary they are the largest activation of a small model (a batch of
2,000 labelled tokens: 400 MB of fp32 logits, and as much again for their gradient).

The model runs with its head swapped for an identity, so its "logits" are the final hidden
states; only the positions that carry a label go on. For each chunk of those rows the head's
logits, their log-sum-exp and the loss are computed, and, when training, the gradients too: the
loss is the last node of the graph, so d loss / d logits = softmax - onehot is known in the
forward pass. Backward then only scales the stored gradients by the incoming one, so the head's
matmuls run as often as in the plain path (forward, and one per gradient) and nothing is
recomputed.

Whether a model's logits really are `head(hidden)` (no logit scaling or soft-capping, a plain
Linear head) is checked once on a short input by `probe`; where they are not, the plain path is
used."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk: 64 MB is ~340 rows of a 49k vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, labels), in chunks of rows; with
    `token_weight` (train/token_weights.py), of each row's cross-entropy times its weight, a
    constant of the logits (no gradient flows through it), so the row's gradient is scaled by it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype, chunk_rows, want_grad, token_weight=None):
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if want_grad and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_grad and ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if want_grad and bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            y = labels[start:start + chunk_rows]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            scale = None if token_weight is None else token_weight(logits, lse - picked)
            total += (lse - picked).sum() if scale is None else ((lse - picked) * scale).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
            grad[torch.arange(y.numel(), device=y.device), y] -= 1.0  # softmax - onehot
            if scale is not None:
                grad.mul_(scale.unsqueeze(1))
            grad = grad.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad @ w
            if grad_weight is not None:
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += (grad.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        out = []
        for has, dtype in zip(ctx.has, ctx.dtypes):
            out.append((next(saved) * grad_output).to(dtype) if has else None)
        return (*out, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor,
                         chunk_rows: int | None = None, token_weight=None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `labels` (rows of hidden, no ignored
    labels), without materialising all logits. Under autocast the matmuls run in its dtype.
    token_weight(logits (rows, vocab) fp32, cross-entropies (rows,)) -> (rows,) weights the rows."""
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) \
        if torch.is_autocast_enabled(device_type) else hidden.dtype
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * head.out_features))
    want_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or head.weight.requires_grad
        or (head.bias is not None and head.bias.requires_grad))
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, compute_dtype,
                                         chunk_rows, want_grad, token_weight)


def _output_head(model) -> tuple[torch.nn.Module, str, torch.nn.Module] | None:
    """(parent module, attribute name, head) of the model's output projection, if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, head
    return None


@contextmanager
def head_as_identity(model):
    """Within the block, the model's forward returns final hidden states as its logits."""
    parent, attr, head = _output_head(model)
    setattr(parent, attr, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def supports_fused_loss(model) -> str | None:
    """None when the fused loss may be used on `model`, else why not (structure only; `probe`
    checks the numbers)."""
    found = _output_head(model)
    if found is None:
        return "the model has no output embeddings"
    if type(found[2]) is not torch.nn.Linear:
        return f"its output head is a {type(found[2]).__name__}, not a plain Linear"
    return None


@contextmanager
def one_thread():
    """torch's CPU ops on one thread meanwhile: a probe's few tokens gain nothing from more, and
    on a busy machine each parallel op waits for its slowest thread (measured on 2 cores shared at
    load ~10: the start-up's probes took 26 CPU s / 134 s wall with 2 threads, 1.2 / 10 with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def probe(model, inputs: dict) -> str | None:
    """Compare the model's own logits with head(hidden states) on `inputs` (a short batch);
    None when they agree, else why they do not."""
    reason = supports_fused_loss(model)
    if reason:
        return reason
    was_training = model.training
    model.eval()
    try:
        with one_thread():
            logits = model(**inputs).logits.float()
            with head_as_identity(model) as head:
                hidden = model(**inputs).logits
            mine = head(hidden).float()
    finally:
        model.train(was_training)
    if mine.shape != logits.shape:
        return f"the model's logits have shape {tuple(logits.shape)}, head(hidden) {tuple(mine.shape)}"
    scale = logits.abs().max().clamp(min=1e-6)
    if not torch.allclose(mine, logits, atol=1e-3 * float(scale), rtol=1e-3):
        return "its logits are not head(hidden states) (logit scaling or soft-capping?)"
    return None


def fused_token_loss_sum(model, head_owner, inputs: dict, labels: torch.Tensor, token_weight=None
                         ) -> tuple[torch.Tensor, int]:
    """Next-token loss sum and label count with the fused head. `model` is what runs the forward
    (maybe wrapped for distributed training); `head_owner` the unwrapped model whose head is
    swapped out. labels: (batch, seq), unshifted. token_weight: see linear_cross_entropy."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    with head_as_identity(head_owner) as head:
        hidden = model(**inputs).logits
    rows = hidden[:, :-1][keep]
    targets = shifted[keep]
    if rows.size(0) == 0:  # no labels: a zero that still depends on the graph
        return hidden.sum() * 0.0, 0
    return linear_cross_entropy(rows, head, targets, token_weight=token_weight), int(targets.numel())
