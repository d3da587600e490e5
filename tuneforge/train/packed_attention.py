"""Varlen attention for padding-free packed rows, registered with transformers as
`tuneforge_packed`.

A packed row holds several sequences; transformers turns their restarting position_ids into a
block-diagonal causal mask (masking_utils), and plain sdpa then attends over the whole L x L row
with that mask: quadratic in L, and on CPU it can cost more than the model's matmuls. Here each
attention call looks at the mask it is given: when it is exactly block-diagonal causal for one
row, attention runs per sequence (causal sdpa on each block) and the blocks are concatenated;
anything else (padded batches, generation with a cache, sliding windows, overlays) goes to
transformers' own sdpa function unchanged. The mask stays the single source of truth, so the
fast path is only taken where it provably computes the same thing.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from . import prompt_cache
from .lean_layers import remember

NAME = "tuneforge_packed"
_SWITCHABLE = ("sdpa",)  # implementations this one stands in for (it delegates to sdpa)


def register() -> str:
    """Make NAME known to transformers (idempotent); returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same mask sdpa gets
    return NAME


def use_packed_attention(model) -> dict:
    """Prepare `model` for packed rows; returns what restore_attention() needs to undo it.

    - use_cache off: with a KV cache transformers does not look for packed position_ids
      (masking_utils), and attention would cross sequences; training needs no cache anyway.
    - attention NAME if the model runs sdpa now; other implementations are kept (flash
      attention handles packed rows itself, eager through the mask)."""
    config = getattr(model, "config", None)
    previous: dict = {}
    caching = _configs_with_cache(model)
    for c in caching:
        c.use_cache = False
    if caching:
        previous["use_cache"] = caching
    current = getattr(config, "_attn_implementation", None)
    if current in _SWITCHABLE and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(register())
        except (ValueError, ImportError):  # keeps sdpa: the probe then judges that
            return previous
        if config._attn_implementation == NAME:  # else the model refused (transformers logs why)
            previous["attn_implementation"] = current
    return previous


def restore_attention(model, previous: dict) -> None:
    """Undo use_packed_attention (before saving a model, or generating with it)."""
    if "attn_implementation" in previous:
        model.set_attn_implementation(previous["attn_implementation"])
    for c in previous.get("use_cache", ()):
        c.use_cache = True


def _configs_with_cache(model) -> list:
    """The model's config and those of its sub-models (a VLM's language model) with use_cache on."""
    found: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            found.setdefault(id(config), config)
    return list(found.values())


# one-entry cache: every layer of a forward gets the same mask object, so it is checked once
_last_mask: tuple[weakref.ref | None, list | None] = (None, None)


def causal_segments(mask) -> list[tuple[int, int, int, int]] | None:
    """The row's attention as segments if `mask` (boolean, 1 x 1 x L x L) is exactly that,
    else None. A segment (prefix_start, prefix_end, start, end) is the queries [start, end),
    each attending to the keys [prefix_start, prefix_end) (none when the two are equal) and
    causally to [start, itself]. Block-diagonal causal rows (packing) have no prefixes; a
    shared-prefix row (a prompt, then replies that each see the prompt but not each other:
    data/shared_prefix.py) has one per reply after the first."""
    global _last_mask
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
            and mask.shape[0] == 1 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]):
        return None
    ref, segments = _last_mask
    if ref is not None and ref() is mask:
        return segments
    segments = _find_segments(mask[0, 0])
    _last_mask = (weakref.ref(mask), segments)
    return segments


def block_causal_starts(mask) -> list[int] | None:
    """Start offsets of the sequences if `mask` (boolean, 1 x 1 x L x L) is exactly
    block-diagonal causal, i.e. each query attends to [start of its block, itself]; else None."""
    segments = causal_segments(mask)
    if segments is None or any(p != q for p, q, _, _ in segments):
        return None
    return [start for _, _, start, _ in segments]


def _find_segments(m: torch.Tensor) -> list[tuple[int, int, int, int]] | None:
    """Segments read off the (L, L) mask, checked by rebuilding the mask from them."""
    length = m.shape[0]
    idx = torch.arange(length, device=m.device)
    if not bool(m.diagonal().all()):
        return None
    run_starts = m & ~torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
    first = m.to(torch.uint8).argmax(dim=-1)  # each query's first attended key
    last_run = (run_starts * idx[None, :]).amax(dim=-1)  # where its last run of keys starts
    prefix_len = m.sum(-1) - (idx - last_run + 1)  # keys before that run (if it is the 2nd)
    prefix_end = torch.where(last_run == first, first, first + prefix_len)
    key = torch.stack([first, prefix_end, last_run], dim=1)
    new = torch.ones(length, dtype=torch.bool, device=m.device)
    new[1:] = (key[1:] != key[:-1]).any(dim=1)
    bounds = [*new.nonzero().flatten().tolist(), length]
    segments = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        p0, p1, run = key[start].tolist()
        if run != start:  # the causal run must begin with the segment's first query
            return None
        segments.append((p0 if p1 > p0 else start, p1 if p1 > p0 else start, start, end))
    if not torch.equal(m, segment_mask(segments, length, m.device)):
        return None
    return segments


def segment_mask(segments, length: int, device=None) -> torch.Tensor:
    """(L, L) boolean mask of segments as causal_segments describes them."""
    mask = torch.zeros(length, length, dtype=torch.bool, device=device)
    for p0, p1, start, end in segments:
        mask[start:end, p0:p1] = True
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool,
                                                device=device).tril()
    return mask


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: (batch, heads, L, dim) in, (batch, L, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prompt_cache.record(module, key, value)
    earlier = prompt_cache.reusing(module)
    if earlier is not None:  # a row of replies to prompts another forward ran (train/prompt_cache.py)
        keys, values, segments = earlier
        return segment_attention(query, torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2),
                                 segments, dropout, scaling, getattr(module, "num_key_value_groups", 1),
                                 query_offset=keys.shape[2]), None
    plain = (query.shape[0] != 1 or query.shape[2] != key.shape[2]
             or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))
             or kwargs.get("output_attentions"))
    segments = None if plain else causal_segments(attention_mask)
    if segments is None or len(segments) < 2 or attention_mask.shape[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return segment_attention(query, key, value, segments, dropout, scaling,
                             getattr(module, "num_key_value_groups", 1)), None


def varlen_attention(query, key, value, starts: list[int], dropout: float = 0.0,
                     scaling: float | None = None, kv_groups: int = 1) -> torch.Tensor:
    """Causal attention within each block [starts[i], starts[i+1]) of one row; GQA keys and
    values are shared by `kv_groups` query heads each. Returns (1, L, heads, dim)."""
    bounds = [*starts, query.shape[2]]
    segments = [(s, s, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    return segment_attention(query, key, value, segments, dropout, scaling, kv_groups)


def segment_attention(query, key, value, segments, dropout: float = 0.0,
                      scaling: float | None = None, kv_groups: int = 1, query_offset: int = 0) -> torch.Tensor:
    """Attention of one row by segments (causal_segments): query/key/value (1, heads, L, dim),
    returns (1, L, heads, dim). A segment without a prefix is one causal sdpa call; one with a
    prefix attends to cat(prefix keys, its own keys) under the mask [all prefix | causal].
    With `query_offset` k, the keys hold k positions before the queries' first (another
    forward's prompts: prompt_cache.py) and segments count in the keys' positions."""
    gqa = {"enable_gqa": True} if kv_groups > 1 else {}
    outs = []
    for p0, p1, s, e in segments:
        q = query[:, :, s - query_offset:e - query_offset]
        if p1 == p0:
            outs.append(F.scaled_dot_product_attention(q, key[:, :, s:e], value[:, :, s:e],
                                                       dropout_p=dropout, scale=scaling, is_causal=True, **gqa))
            continue
        keys = torch.cat([key[:, :, p0:p1], key[:, :, s:e]], dim=2)
        values = torch.cat([value[:, :, p0:p1], value[:, :, s:e]], dim=2)
        visible = torch.ones(e - s, p1 - p0 + e - s, dtype=torch.bool, device=query.device)
        visible[:, p1 - p0:] = visible[:, p1 - p0:].tril()
        outs.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=visible,
                                                   dropout_p=dropout, scale=scaling, **gqa))
    out = torch.cat(outs, dim=2).transpose(1, 2).contiguous()
    # o_proj keeps `out` for backward while sdpa keeps `outs`: inside a lean layer, o_proj keeps
    # a recipe that rebuilds `out` from `outs` instead (train/lean_layers.py)
    remember(out, lambda: torch.cat(outs, dim=2).transpose(1, 2).contiguous())
    return out
