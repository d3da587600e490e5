"""Prompt records for the stages that generate their own replies (grpo, ppo): SFT data (alpaca or
sharegpt conversations ending on an assistant reply) read as the conversation up to its last
reply, the prompt, plus that reply as the reference a reward function may compare with.

Each record becomes {"input_ids", "reference_ids"}: the prompt rendered with the chat template up
to the last reply (the generation prompt included: it ends where the assistant's reply starts),
and the reply's tokens as the template renders them. A prompt longer than cutoff_len keeps its
last cutoff_len tokens (the end is where generation starts). PromptCollator left-pads the
prompts (batched generation appends to the right) and right-pads the references with -100."""

from __future__ import annotations

import torch

from .collate import pad_id
from .encode import IGNORE_INDEX, last_reply_ids
from .formats import fill_placeholders, to_conversations
from .loader import RecordKind
from .workers import each


def encode_prompts(conversations: list, data_args, tokenizer) -> list[dict]:
    """{"input_ids": prompt ids, "reference_ids": last reply ids} per conversation (`placeholders`
    filled as for sft)."""
    return each(_encode, conversations, data_args, tokenizer)


def _encode(conversations: list, data_args, tokenizer) -> list[dict]:
    fill_placeholders(conversations, getattr(data_args, "placeholders", None))
    cutoff_len = getattr(data_args, "cutoff_len", 2048)
    return [{"input_ids": prompt[-cutoff_len:], "reference_ids": reply}
            for prompt, reply in last_reply_ids(tokenizer, conversations)]


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


class PromptCollator:
    """Prompt examples -> {"input_ids", "attention_mask"} (left-padded prompts) and
    "reference_ids" (the reference replies, right-padded with -100)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_id(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        ids, mask = left_pad([e["input_ids"] for e in examples], self.pad_token_id)
        width = max(1, max(len(e["reference_ids"]) for e in examples))
        reference = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            reference[i, :len(e["reference_ids"])] = torch.as_tensor(e["reference_ids"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "reference_ids": reference}


PROMPTS = RecordKind("conversations", to_conversations, encode_prompts)
