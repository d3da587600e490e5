"""Shared-prefix rows or padding: which collator the stages that score replies (dpo, kto) use.

A shared-prefix row (data/shared_prefix.py) runs each pair's prompt once and needs no padding,
but it is only right for a model that reads position_ids and takes a 4-D boolean attention mask
as it is given. As for packing (train/packing.py), a probe decides: the actual model (adapters
included) scores two short random pairs both ways before training, and the logits at the scored
positions must agree. The `packing` key decides as it does for sft: false = padding, true =
shared-prefix rows or a ConfigError, unset = the probe."""

from __future__ import annotations

import torch

from ..data.pairwise import PairwiseCollator
from ..data.shared_prefix import SharedPrefixCollator
from ..errors import ConfigError, TuneforgeError
from .packed_attention import restore_attention, use_packed_attention
from .packing import CollatorChoice, disagreement, packing_wanted

PROBE_PAIRS = ((3, 4, 2), (5, 1, 6))  # (prompt, chosen, rejected) lengths: padding and both orders


def choose_pair_collator(data_args, model, pad_token_id: int | None) -> CollatorChoice:
    """stage: dpo's collator: shared-prefix pairs or padded pairs (choose_shared_prefix)."""
    return choose_shared_prefix(data_args, model, SharedPrefixCollator(), PairwiseCollator(pad_token_id))


def choose_shared_prefix(data_args, model, shared, padded) -> CollatorChoice:
    """The `shared` collator (shared-prefix rows) for this run if the model scores such rows
    exactly, else `padded`; choosing shared-prefix rows prepares `model` for them
    (use_packed_attention). Raises ConfigError when packing: true and the rows are not exact on
    this model."""
    wanted = packing_wanted(data_args)
    if wanted is False:
        return CollatorChoice(padded, None, lambda: None)
    previous = use_packed_attention(model)
    problem = probe_shared_prefix(model, PairwiseCollator(0))
    if problem is None:
        return CollatorChoice(shared, "shared-prefix rows: on (each prompt runs once, no padding)",
                              lambda: restore_attention(model, previous))
    restore_attention(model, previous)
    if wanted:
        raise ConfigError(f"config key 'packing' is true, but shared-prefix rows do not reproduce the padded "
                          f"pairs on this model ({problem}); set packing: false")
    return CollatorChoice(padded, f"shared-prefix rows: off, padded rows instead ({problem})", lambda: None)


def probe_pairs(vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    pairs = []
    for p, c, r in PROBE_PAIRS:
        prompt = ids(p)
        pairs.append({"chosen_ids": prompt + ids(c), "rejected_ids": prompt + ids(r), "prompt_len": p})
    return pairs


def probe_shared_prefix(model, padded_collator) -> str | None:
    """None if a shared-prefix row gives this model the padded pairs' logits at every scored
    position, else the reason."""
    try:
        vocab = model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
    except (AttributeError, StopIteration) as exc:
        return f"cannot probe the model: {exc}"
    pairs = probe_pairs(vocab)
    padded = {k: v.to(device) for k, v in padded_collator(pairs).items()}
    shared = {k: v.to(device) for k, v in SharedPrefixCollator()(pairs).items()}
    keep = padded["labels"][:, 1:] != -100
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            got = model(input_ids=shared["input_ids"], position_ids=shared["position_ids"],
                        attention_mask=shared["attention_mask"]).logits
            alone = [model(input_ids=padded["input_ids"][i:i + 1, :int(padded["attention_mask"][i].sum())]).logits[0]
                     for i in range(keep.size(0))]
    except Exception as exc:  # noqa: BLE001 - any failure means "no shared-prefix rows on this model"
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        if isinstance(exc, TuneforgeError):
            return first_line
        return f"a probe forward failed: {type(exc).__name__}: {first_line}"
    finally:
        model.train(was_training)
    reference_at = reference[:, :-1][keep]
    alone_at = torch.cat([a[:-1][keep[i, :a.size(0) - 1]] for i, a in enumerate(alone)])
    # the padded batch's scored tokens, sequence by sequence, in the shared row's order
    order = torch.argsort(shared["score_row"], stable=True)
    return disagreement(got[0][shared["score_from"][order]], reference_at, alone_at, model, "shared-prefix")

