"""The pieces of a decode loop whose batch changes between steps (continuous batching):
picking each row's next token with its own sampling settings, and reshaping a transformers
DynamicCache as rows join (left-padded to a common length) and leave (dropped, then the
padding columns no row needs any more are cut)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    """One row's decoding settings (transformers generate()'s meaning for each)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "Sampling":
        pick = {k: kwargs[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                if kwargs.get(k) is not None}
        return cls(do_sample=bool(kwargs.get("do_sample")), **pick)


def processed_logits(logits: torch.Tensor, history: list[int], s: Sampling) -> torch.Tensor:
    """logits: (vocab,) for one row, as transformers' processors leave them before the choice:
    repetition penalty over every token seen (prompt included), then for sampling temperature,
    top-k and top-p (removed tokens at -inf)."""
    logits = logits.float().clone()
    if s.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        score = logits[seen]
        logits[seen] = torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty)
    if not s.do_sample:
        return logits
    logits = logits / s.temperature
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if s.top_p < 1.0:  # sorted: only what top-k left (a sort of the whole vocabulary is slow)
        kept = (logits != float("-inf")).nonzero().squeeze(-1)
        ordered, order = torch.sort(logits[kept], descending=True)
        probs = torch.softmax(ordered, -1)
        drop = probs.cumsum(-1) - probs >= s.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False                             # and always the likeliest token (top_p 0 too)
        logits[kept[order[drop]]] = float("-inf")
    return logits


def next_token(logits: torch.Tensor, history: list[int], s: Sampling,
               generator: torch.Generator | None) -> int:
    """Greedy, or one draw from `generator` (the row's own: a seeded row repeats in any batch).
    A temperature so small that the scaled logits overflow picks the likeliest token, the limit
    sampling approaches as the temperature falls to 0."""
    scaled = processed_logits(logits, history, s)
    if not s.do_sample:
        return int(scaled.argmax())
    probs = torch.softmax(scaled, -1).cpu()
    if not bool(torch.isfinite(probs).all()):  # overflowed: several tokens may be at +inf
        greedy = Sampling(repetition_penalty=s.repetition_penalty)
        return int(processed_logits(logits, history, greedy).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def can_reshape(cache) -> bool:
    """Rows may join a running batch only on a cache of plain full-attention layers."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and layer.keys is not None
                                for layer in layers)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, width, D), zeros in front."""
    if t.shape[2] == width:
        return t
    pad = t.new_zeros(t.shape[0], t.shape[1], width - t.shape[2], t.shape[3])
    return torch.cat([pad, t], dim=2)


def join(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor):
    """Rows of `new_cache` appended after those of `cache`; both left-padded to the longer length.
    Returns (cache, mask); `cache` is changed in place."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(new.keys, width)])
        layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(new.values, width)])
    pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
    return cache, torch.cat([pad(mask), pad(new_mask)])


def keep_rows(cache, mask: torch.Tensor, keep: list[int]):
    """Only rows `keep`, and without the leading columns that are padding in all of them."""
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask[index]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return cache, mask[:, start:]
