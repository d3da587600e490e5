"""The model call with virtual tokens (virtual_tokens.py): a forward pre-hook rewrites the
arguments, a forward hook trims the outputs back to the real tokens.

Each row of a batch gets the virtual tokens of its adapter (routing: route_adapters' name per
row; else the one active virtual-token adapter), right-aligned in a block as wide as the widest
of them, so rows of different adapters (or none) share one batch exactly: the block's unused
columns are masked out. The block is [key/value prefixes (Nkv) | input prompts (Nin)]:

- prefill (no cache, or an empty one): prompts are embedded before the input embeddings
  (`inputs_embeds`, labels get -100 in front), key/value prefixes are written into the cache
  (a `DynamicCache`, the caller's empty one when it gave one);
- decoding (a cache that already holds the block): nothing is added, only the mask and the
  positions account for it.

The attention mask a caller passes covers its real tokens (what `generate` and the training loop
pass: the block's columns are put in front), or the whole cache and the new tokens (what a
caller that keeps its own mask over the cache passes, with `virtual_mask()` in front); the
width tells which. Position ids follow the same two readings: positions of the real tokens
counted from the first real token (shifted here by the row's virtual tokens), or positions in
the whole sequence. Virtual token j of a row has position j, its real tokens follow (as in peft:
prompt tuning runs positions 0..N+T-1, prefix tuning N..N+T-1).

Packed rows (position ids that restart within a row, no attention mask) are refused: the virtual
tokens would come once per row, not once per sequence. A training forward with key/value prefixes
runs without activation checkpointing (transformers' checkpointed layers drop the cache, and the
prefix with it); it is paused for that call and said once in the log.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

from tuneforge.errors import ConfigError

IGNORE = -100
HOLDER = "tuneforge_virtual_tokens"  # the model's attribute holding the virtual-token adapters

log = logging.getLogger("tuneforge")


@dataclass
class Plan:
    rows: list[str | None]
    n_kv: torch.Tensor  # (B,) key/value prefix length per row
    n_in: torch.Tensor  # (B,) input prompt length per row
    kv_width: int
    in_width: int
    virtual: torch.Tensor  # (B, kv_width + in_width) mask of the block

    @property
    def width(self) -> int:
        return self.kv_width + self.in_width

    @property
    def padded(self) -> bool:
        return bool((self.virtual == 0).any())


def layout(vt, rows: list[str | None], device) -> Plan:
    n_kv = torch.tensor([vt.encoders[r].num_virtual_tokens if r and vt.encoders[r].kind == "kv" else 0
                         for r in rows], device=device)
    n_in = torch.tensor([vt.encoders[r].num_virtual_tokens if r and vt.encoders[r].kind == "input" else 0
                         for r in rows], device=device)
    kv_w, in_w = int(n_kv.max()), int(n_in.max())
    cols_kv = torch.arange(kv_w, device=device)
    cols_in = torch.arange(in_w, device=device)
    mask = torch.cat([(cols_kv >= kv_w - n_kv[:, None]), (cols_in >= in_w - n_in[:, None])], dim=1)
    return Plan(rows, n_kv, n_in, kv_w, in_w, mask.long())


def _block(vt, plan: Plan, kind: str, width: int, dtype, device) -> torch.Tensor:
    """(B, width, dim) of the rows' encoder outputs, right-aligned, zeros in front."""
    cache: dict[str, torch.Tensor] = {}
    parts = []
    dim = None
    for r in plan.rows:
        if r is not None and vt.encoders[r].kind == kind:
            if r not in cache:
                cache[r] = vt.encoders[r].prompt().to(device=device, dtype=dtype)
            dim = cache[r].shape[-1]
    if len(set(plan.rows)) == 1 and plan.rows[0] in cache:  # one adapter for all rows
        p = cache[plan.rows[0]]
        return p.unsqueeze(0).expand(len(plan.rows), *p.shape)
    for r in plan.rows:
        p = cache.get(r) if r is not None else None
        if p is None:
            p = torch.zeros(0, dim, dtype=dtype, device=device)
        if p.shape[0] < width:
            p = torch.cat([p.new_zeros(width - p.shape[0], dim), p])
        parts.append(p)
    return torch.stack(parts)


def _fill_cache(model: nn.Module, vt, plan: Plan, cache, dtype, device):
    """The key/value prefixes of the block, written into `cache` (a new DynamicCache when None)."""
    from transformers import DynamicCache

    enc = next(vt.encoders[r] for r in plan.rows if r is not None and vt.encoders[r].kind == "kv")
    layers, heads = enc.num_layers, enc.num_attention_heads
    kv = _block(vt, plan, "kv", plan.kv_width, dtype, device)  # (B, N, L*2*dim)
    b, n = kv.shape[:2]
    kv = kv.reshape(b, n, layers * 2, heads, -1).permute(2, 0, 3, 1, 4)  # (L*2, B, H, N, hd)
    if cache is None:
        cache = DynamicCache(config=model.config)
    for layer in range(layers):
        cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
    return cache


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if cache else 0
    return int(cache.get_seq_length())


def _pause_checkpointing(model: nn.Module, vt) -> None:
    """transformers' checkpointed layers drop the cache in training, and the prefix with it: this
    forward runs without activation checkpointing (turned on again by the forward hook; said once)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not layers:
        return
    if not vt.warned_checkpointing:
        log.warning("gradient_checkpointing is off while a prefix-tuning adapter trains: transformers' "
                    "checkpointed layers drop the cache, which holds the prefix")
        vt.warned_checkpointing = True
    for m in layers:
        m.gradient_checkpointing = False
    vt.paused.extend(layers)


def _packed(position_ids: torch.Tensor) -> bool:
    return position_ids.dim() == 2 and position_ids.shape[1] > 1 and bool((position_ids.diff(dim=1) < 0).any())


def _rewrite(model: nn.Module, vt, kwargs: dict, cache_name: str) -> int | None:
    """Rewrite `kwargs` in place; returns the number of real tokens when outputs must be trimmed."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    x = ids if ids is not None else embeds
    if x is None:
        return None
    batch, t = x.shape[0], x.shape[1]
    rows = vt.row_adapters(batch)
    if all(r is None for r in rows):
        return None
    device = x.device
    plan = layout(vt, rows, device)
    cache_key = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None), cache_name)
    cache = kwargs.get(cache_key)
    past = _cache_length(cache)
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() != 2:
        raise ConfigError("virtual-token adapters need a 2D attention mask (batch, length), not a 4D one")
    if pos is not None and mask is None and _packed(pos):
        raise ConfigError(
            "virtual tokens (prompt / prefix tuning) come once per row, so a row packed with several "
            "sequences cannot give each its own (pad the batch instead)"
        )
    if plan.kv_width and model.training:
        _pause_checkpointing(model, vt)
    prefill = past == 0
    if prefill:
        whole = mask is not None and mask.shape[1] == plan.width + t
        if mask is not None and not whole and mask.shape[1] != t:
            raise ConfigError(f"attention_mask has {mask.shape[1]} columns for {t} tokens and "
                              f"{plan.width} virtual ones")
    else:
        whole = mask is not None and mask.shape[1] == past + t
        if mask is not None and not whole and mask.shape[1] != past - plan.width + t:
            raise ConfigError(f"attention_mask has {mask.shape[1]} columns for a cache of {past} and {t} "
                              f"new tokens ({plan.width} of the cache are virtual tokens)")
    # the full mask: virtual block (unless the caller's covers it), then the caller's columns
    full = None
    if mask is not None:
        full = mask if whole else torch.cat([plan.virtual.to(mask.dtype), mask], dim=1)
    elif plan.padded:
        ones = torch.ones(batch, (past - plan.width if not prefill else 0) + t, dtype=torch.long, device=device)
        full = torch.cat([plan.virtual, ones], dim=1)
    if full is not None:
        kwargs["attention_mask"] = full
    if pos is not None and not whole:
        pos = pos + (plan.n_kv + plan.n_in)[:, None].to(pos.dtype)
    elif pos is None and plan.padded:
        pos = (full.cumsum(-1) - 1).clamp(min=0)[:, -t:]
    trim = None
    if prefill and plan.in_width:
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompts = _block(vt, plan, "input", plan.in_width, embeds.dtype, device)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        kwargs["input_ids"] = None
        if pos is not None:
            before = plan.virtual[:, : plan.kv_width].sum(-1, keepdim=True)
            virtual_pos = (before + plan.virtual[:, plan.kv_width:].cumsum(-1) - 1).clamp(min=0)
            pos = torch.cat([virtual_pos.to(pos.dtype), pos], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((batch, plan.in_width), IGNORE), labels], dim=1)
        keep = kwargs.get("logits_to_keep")
        if torch.is_tensor(keep):
            kwargs["logits_to_keep"] = keep + plan.in_width
        trim = t
    if pos is not None:
        kwargs["position_ids"] = pos
    if prefill and plan.kv_width:
        dtype = (embeds if embeds is not None else model.get_input_embeddings().weight).dtype
        kwargs[cache_key] = _fill_cache(model, vt, plan, cache, dtype, device)
    return trim


def install(model: nn.Module, vt) -> None:
    """Put the hooks on `model` (their handles are kept by `vt`, whose strip() removes them); they
    act through the model's `tuneforge_virtual_tokens` module."""
    params = list(inspect.signature(model.forward).parameters)
    cache_name = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it

    def pre(module, args, kwargs):
        vt = module._modules.get(HOLDER)  # looked up per call: a deep copy of the model uses its own
        if vt is None:
            return None
        if args:  # positional arguments by name, so that the rewrite sees them
            kwargs = {**dict(zip(params, args)), **kwargs}
            args = ()
        kwargs = dict(kwargs)
        vt.calls.append(None)  # popped by `post`, also when the forward raises (always_call)
        vt.calls[-1] = _rewrite(module, vt, kwargs, cache_name)
        return args, kwargs

    def post(module, args, kwargs, output):
        vt = module._modules.get(HOLDER)
        if vt is None:
            return output
        t = vt.calls.pop() if vt.calls else None
        if vt.paused and not vt.calls:  # checkpointing back on after the outermost call
            for m in vt.paused:
                m.gradient_checkpointing = True
            vt.paused.clear()
        if t is None or not hasattr(output, "keys"):
            return output
        logits = output.get("logits")
        if logits is not None and logits.shape[1] > t:
            output["logits"] = logits[:, -t:]
        hidden = output.get("hidden_states")
        if hidden is not None:
            output["hidden_states"] = tuple(h[:, -t:] if h.shape[1] > t else h for h in hidden)
        return output

    vt._hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
        model.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]
