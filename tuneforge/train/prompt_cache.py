"""Prompts' keys and values kept from one forward and attended to by another (a prompt cache for
training-time scoring, stage: kto).

KTO scores, besides each example's reply to its prompt, a mismatched reply to (the start of) the
same prompt (its KL estimate), with the policy and with the reference model. Run as rows of their
own, the mismatched rows forward every prompt again. Here the forward over the main rows
(prompt | reply, data/shared_prefix.py) records each attention layer's keys and values
(`capture`), and the forward over the mismatched replies alone attends, per reply, to the
recorded keys and values of the prompt tokens it sees and to its own earlier tokens (`reuse`):
what a causal forward over [prompt | mismatched reply] computes, without the prompt's matmuls.
Keys are recorded after the rotary embedding (transformers' attention functions receive them
so), so the reply row's position_ids continue the prompt's.

The attention function train/packed_attention.packed_sdpa_attention reads the state kept here;
it is the only attention that does (shared-prefix rows on: train/shared_prefix.py), so a caller
reuses only what was recorded (an empty record: another attention ran). The recorded
tensors are detached (the reusing forward runs without gradient) and are views of what the
recording forward's attention keeps anyway."""

from __future__ import annotations

from contextlib import contextmanager

import torch

_STATE: dict = {"capture": None, "reuse": None}


@contextmanager
def capture():
    """Record every attention layer's keys and values, (1, kv_heads, L, head_dim) each, of the
    forward run inside; yields the dict (layer module -> (keys, values)) they go into."""
    recorded: dict = {}
    previous, _STATE["capture"] = _STATE["capture"], recorded
    try:
        yield recorded
    finally:
        _STATE["capture"] = previous


@contextmanager
def reuse(recorded: dict, segments: torch.Tensor):
    """Inside: each attention layer attends with cat(recorded keys, its own keys) (values alike)
    by `segments` (m, 4) int: (prefix_start, prefix_end, start, end) in those concatenated
    coordinates, queries [start, end) of the row offset by the recorded length (as
    packed_attention.causal_segments describes segments). Raises KeyError if a layer has
    nothing recorded."""
    state = (recorded, [tuple(int(x) for x in s) for s in segments.tolist()])
    previous, _STATE["reuse"] = _STATE["reuse"], state
    try:
        yield
    finally:
        _STATE["reuse"] = previous


def record(module, key: torch.Tensor, value: torch.Tensor) -> None:
    """Called by the attention function for each layer: keep its keys and values while capturing."""
    recorded = _STATE["capture"]
    if recorded is not None:
        recorded[module] = (key.detach(), value.detach())


def reusing(module):
    """(recorded keys, recorded values, segments) for this layer while reusing, else None."""
    state = _STATE["reuse"]
    if state is None:
        return None
    recorded, segments = state
    keys, values = recorded[module]
    return keys, values, segments
