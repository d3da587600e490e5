"""Dynamic-mask fine-tuning (sft's `dynamic_mask_ratio`): in each training batch, every input
token without a label (the prompt: the system and user turns, the template's words; never a
reply token that is learned, never a special token) is replaced by a mask token with
probability `ratio`, and the mask is drawn again every epoch. It is token-level input dropout
(the "word dropout" of Iyyer et al. 2015 and Bowman et al. 2016, which replaces input words by
<unk>) with RoBERTa's dynamic masking (Liu et al. 2019: a new mask each time a sequence is
seen, rather than BERT's one static mask); LLaMA-Factory has no such key (its neftune_noise_alpha
adds noise to the embeddings instead). Labels are never changed, so the loss is sft's.

The mask of an example is a pure function of (seed, epoch, the example's index in the training
set): a resumed run draws exactly the masks of the uninterrupted one. Evaluation batches are
never masked. The mask token is the tokenizer's mask token, else its unk token, else its pad
token (which tuneforge sets to eos when a tokenizer has none)."""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX


def mask_token(tokenizer) -> tuple[int, str]:
    """(id, which): the token that replaces masked inputs, and which of the tokenizer's it is."""
    for which in ("mask", "unk", "pad"):
        token_id = getattr(tokenizer, f"{which}_token_id", None)
        if token_id is not None:
            return int(token_id), which
    raise ValueError("the tokenizer has no mask, unk or pad token")


def mask_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one example's mask in one epoch."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1))


def masked_ids(example: dict, ratio: float, token_id: int, protected: frozenset,
               generator: torch.Generator) -> list[int]:
    """The example's input_ids with each unlabelled, non-special token replaced by token_id with
    probability ratio."""
    ids = list(example["input_ids"])
    draws = torch.rand(len(ids), generator=generator).tolist()
    for t, (token, label, u) in enumerate(zip(ids, example["labels"], draws)):
        if u < ratio and label == IGNORE_INDEX and token not in protected:
            ids[t] = token_id
    return ids


class DynamicMask:
    """A collator wrapper: `collate_at(examples, seed=, epoch=, indices=)` (what the training
    stream calls: train/batches.MicroBatchStream) masks the prompt tokens of each example, then
    collates; a plain call (evaluation) collates the examples as they are."""

    def __init__(self, collate, ratio: float, token_id: int, protected=()):
        self.collate, self.ratio, self.token_id = collate, ratio, token_id
        self.protected = frozenset(int(i) for i in protected)

    def __call__(self, examples: list[dict]) -> dict:
        return self.collate(examples)

    def collate_at(self, examples: list[dict], *, seed: int, epoch: int, indices: list[int]) -> dict:
        masked = [{**e, "input_ids": masked_ids(e, self.ratio, self.token_id, self.protected,
                                                mask_generator(seed, epoch, i))}
                  for e, i in zip(examples, indices)]
        return self.collate(masked)
