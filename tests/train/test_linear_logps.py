"""train/linear_logps.py: the chunked per-token log-probs equal log_softmax(head(hidden)) at the
targets, values and gradients, in chunks or not; a trained head is refused."""

from __future__ import annotations

import pytest
import torch

from tuneforge.train.linear_logps import frozen_linear, linear_logps


@pytest.mark.parametrize("chunk_rows", [3, None])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_log_softmax(chunk_rows, bias):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(7, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=g)
    upstream = torch.randn(7, generator=g)
    got = linear_logps(hidden, head, targets, chunk_rows)
    (grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
    want = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_logps(hidden, head, targets, chunk_rows), want.detach())


def test_a_trained_head_keeps_the_plain_path():
    head = torch.nn.Linear(8, 50)
    assert not frozen_linear(head) and frozen_linear(head.requires_grad_(False))
    with pytest.raises(ValueError, match="frozen"):
        linear_logps(torch.zeros(2, 8), torch.nn.Linear(8, 50), torch.zeros(2, dtype=torch.long))
