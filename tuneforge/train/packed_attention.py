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
_last_mask: tuple[weakref.ref | None, list[int] | None] = (None, None)


def block_causal_starts(mask) -> list[int] | None:
    """Start offsets of the sequences if `mask` (boolean, 1 x 1 x L x L) is exactly
    block-diagonal causal, i.e. each query attends to [start of its block, itself]; else None."""
    global _last_mask
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
            and mask.shape[0] == 1 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]):
        return None
    ref, starts = _last_mask
    if ref is not None and ref() is mask:
        return starts
    starts = _check_block_causal(mask[0, 0])
    _last_mask = (weakref.ref(mask), starts)
    return starts


def _check_block_causal(m: torch.Tensor) -> list[int] | None:
    length = m.shape[0]
    idx = torch.arange(length, device=m.device)
    first = m.to(torch.uint8).argmax(dim=-1)  # first attended key of each query
    # a block starts where a query's first key is itself; every later query of the block must
    # start there too
    block_start = torch.where(first == idx, idx, 0).cummax(dim=0).values
    if not torch.equal(first, block_start):
        return None
    expected = (idx[None, :] >= first[:, None]) & (idx[None, :] <= idx[:, None])
    if not torch.equal(m, expected):
        return None
    return (first == idx).nonzero().flatten().tolist()


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: (batch, heads, L, dim) in, (batch, L, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (query.shape[0] != 1 or query.shape[2] != key.shape[2]
             or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))
             or kwargs.get("output_attentions"))
    starts = None if plain else block_causal_starts(attention_mask)
    if starts is None or len(starts) < 2 or attention_mask.shape[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return varlen_attention(query, key, value, starts, dropout, scaling,
                            getattr(module, "num_key_value_groups", 1)), None


def varlen_attention(query, key, value, starts: list[int], dropout: float = 0.0,
                     scaling: float | None = None, kv_groups: int = 1) -> torch.Tensor:
    """Causal attention within each block [starts[i], starts[i+1]) of one row; GQA keys and
    values are shared by `kv_groups` query heads each. Returns (1, L, heads, dim)."""
    gqa = {"enable_gqa": True} if kv_groups > 1 else {}
    bounds = [*starts, query.shape[2]]
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                           dropout_p=dropout, scale=scaling, is_causal=True, **gqa)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()
