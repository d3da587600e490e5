"""LLaMA-Factory's `new_special_tokens` (newer name `add_special_tokens`), `add_tokens` and
`resize_vocab`: tokens added to the tokenizer (as special tokens, or ordinary ones), the
embeddings resized (to a multiple of 64 rows, the new tokens' rows set to the mean of the old
rows plus noise of std 1/sqrt(hidden), as LLaMA-Factory does), and an adapter trained on a
resized vocabulary loaded with the tokenizer saved beside it.

An adapter method trains the input embedding and the output head in full (modules_to_save, as
LLaMA-Factory sets additional_target), so peft loads the adapter on a base resized the same way:
`model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)` with the adapter's tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from .errors import ModelError

log = logging.getLogger("tuneforge")

PAD_TO = 64  # LLaMA-Factory's pad_to_multiple_of
RESIZED = "tuneforge_resized_vocab"  # model attribute: (rows before, rows after)


def split_tokens(text: str | None) -> list[str]:
    """`new_special_tokens: "<a>,<b>"` (a YAML list is joined by config_values) -> ["<a>", "<b>"]."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def embedding_names(model) -> list[str]:
    """The leaf names of the input embedding and the output head (embed_tokens, lm_head), as
    LLaMA-Factory's additional_target for a resized vocabulary."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    names = []
    for name, module in model.named_modules():
        if any(module is m for m in wanted) and name.split(".")[-1] not in names:
            names.append(name.split(".")[-1])
    return names


def add_new_tokens(model, tokenizer, model_args) -> None:
    """Add new_special_tokens to `tokenizer` and, when that grows it or resize_vocab is set, make
    the model's embeddings hold every token (LLaMA-Factory's patch_tokenizer and
    resize_embedding_layer)."""
    special = split_tokens(getattr(model_args, "new_special_tokens", None) or
                           getattr(model_args, "add_special_tokens", None))
    plain = split_tokens(getattr(model_args, "add_tokens", None))
    added = 0
    for tokens, is_special in ((plain, False), (special, True)):
        count = tokenizer.add_tokens(tokens, special_tokens=is_special) if tokens else 0
        if count:
            log.info("added %stokens %s to the tokenizer", "special " if is_special else "", ", ".join(tokens))
        added += count
    if added or getattr(model_args, "resize_vocab", False):
        resize_embeddings(model, tokenizer, plain + special)


@torch.no_grad()
def resize_embeddings(model, tokenizer, new_tokens: list[str]) -> None:
    """Grow the embeddings to len(tokenizer) rounded up to 64 rows (never shrink); the rows of
    `new_tokens` get the mean of the other rows plus Gaussian noise (std 1/sqrt(hidden size))."""
    before = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > before:
        if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
            raise ModelError(f"{type(model).__name__} has no Linear output head, so its vocabulary cannot be "
                             "resized for new_special_tokens / resize_vocab")
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_TO, mean_resizing=False)
    after = model.get_input_embeddings().weight.shape[0]
    ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in new_tokens} - {None, tokenizer.unk_token_id})
    ids = [i for i in ids if 0 <= i < after]
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    for weight in weights:
        if ids:
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[ids] = False
            mean = weight[keep].float().mean(dim=0, keepdim=True)
            noise = torch.randn(len(ids), weight.shape[1], device=weight.device) / math.sqrt(weight.shape[1])
            weight[ids] = (mean + noise).to(weight.dtype)
    if after != before:
        setattr(model, RESIZED, (before, after))
        log.info("vocabulary resized: %d -> %d embedding rows", before, after)


def adapter_tokenizer(model, tokenizer, paths: list[str]):
    """The tokenizer saved beside the last adapter in `paths` when it holds more tokens than
    `tokenizer` (the adapter was trained with new_special_tokens / resize_vocab), with the model's
    embeddings grown to the rows the adapter's trained embeddings have; else `tokenizer`."""
    if not paths or not (Path(paths[-1]) / "tokenizer_config.json").is_file():
        return tokenizer
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(paths[-1])
    except Exception:  # noqa: BLE001 - a tokenizer that does not load is not this adapter's vocabulary
        return tokenizer
    if len(theirs) <= len(tokenizer):
        return tokenizer
    if theirs.pad_token_id is None:
        theirs.pad_token = theirs.eos_token
    rows = _trained_rows(model, paths[-1])
    if rows is None:
        raise ModelError(f"adapter '{paths[-1]}' has a tokenizer of {len(theirs)} tokens but the base model's "
                         f"has {len(tokenizer)}, and the adapter holds no trained embeddings for the added "
                         "ones; train it with resize_vocab (or new_special_tokens), or remove its tokenizer files")
    current = model.get_input_embeddings().weight.shape[0]
    if rows > current:
        model.resize_token_embeddings(rows, mean_resizing=False)
        setattr(model, RESIZED, (current, rows))
        log.info("adapter '%s' was trained on a vocabulary of %d rows (its tokenizer: %d tokens): the base "
                 "model's embeddings are resized to it", paths[-1], rows, len(theirs))
    return theirs


def _trained_rows(model, path: str) -> int | None:
    """Rows of the input-embedding tensor the adapter file holds in full (modules_to_save), or None."""
    from safetensors import safe_open

    file = Path(path) / "adapter_model.safetensors"
    names = [n for n, m in model.named_modules() if m is model.get_input_embeddings()]
    if not file.is_file() or not names:
        return None
    try:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith(f"{names[0]}.weight") and ".lora_" not in key:
                    return f.get_slice(key).get_shape()[0]
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return None
