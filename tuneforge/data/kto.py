"""KTO records (LLaMA-Factory's `kto_tag` column) for stage: kto: a conversation ending on an
assistant reply (sharegpt messages, or alpaca instruction / input / output) and a tag saying
whether that reply is desirable (true) or undesirable (false).

Each record becomes {"input_ids", "prompt_len", "kto_tag", "kl_reply"}: the prompt rendered with
the chat template up to the last reply (its first prompt_len tokens), then the reply as the
template renders it (EOS added where the template does not end replies with it), within
cutoff_len by LLaMA-Factory's rule (the budget is split between prompt and reply); kl_reply is the
reply of the record before it in its dataset (the last one's for the first), LLaMA-Factory's
mismatched pair for the KL estimate, made when the data is read so that a micro-batch of one
example has one too. KtoCollator batches them with their labels on the reply tokens and the
mismatched rows: the prompt of each example with its kl_reply."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collate import pad_id
from .encode import IGNORE_INDEX, last_reply_ids, split_budget
from .formats import (Conversation, _check_columns, conversation_converter,
                      _refuse, convert_records)
from .issues import describe_value
from .loader import RecordKind
from .pairwise import pad_rows
from .readers import Records
from .registry import DatasetEntry
from .workers import each

USABLE = "a conversation ending on a non-empty assistant reply, with a kto_tag"


@dataclass
class Feedback:
    conversation: Conversation  # ends on the assistant reply that is judged
    desirable: bool


def to_feedback(entry: DatasetEntry, records: Records, indices: list[int] | None = None) -> list[Feedback]:
    """The records (those at `indices`, in that order, when given) as tagged conversations.

    Raises DataError for a missing column, a value of the wrong type (a kto_tag that is not
    true or false), or when no record is usable."""
    convert = conversation_converter(entry, records)
    _check_columns(entry, records, ["kto_tag"])
    column = entry.column("kto_tag")

    def feedback(entry: DatasetEntry, record: dict, where: str) -> Feedback:
        tag = record[column]
        if not isinstance(tag, bool):
            raise _refuse(entry, where, f"column {column!r} (kto_tag) holds {describe_value(tag)}, not true "
                          "or false", "write true for a desirable reply, false for an undesirable one")
        return Feedback(convert(entry, record, where), tag)

    return convert_records(entry, records, indices, feedback, USABLE)


def encode_feedback(items: list[Feedback], data_args, tokenizer) -> list[dict]:
    """{"input_ids", "prompt_len", "kto_tag", "kl_reply"} per record (see the module's docstring)."""
    cutoff_len = getattr(data_args, "cutoff_len", 2048)
    examples = []
    for item, (prompt, reply) in zip(items, each(_reply_ids, items, data_args, tokenizer)):
        keep_prompt, keep_reply = split_budget(len(prompt), len(reply), cutoff_len)
        examples.append({"input_ids": prompt[:keep_prompt] + reply[:keep_reply], "prompt_len": keep_prompt,
                         "kto_tag": int(item.desirable)})
    for example, before in zip(examples, examples[-1:] + examples[:-1]):  # the completions shifted by one
        example["kl_reply"] = before["input_ids"][before["prompt_len"]:]
    return examples


def _reply_ids(items: list[Feedback], data_args, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) of each record (workers.each runs it)."""
    return last_reply_ids(tokenizer, [item.conversation for item in items])


class KtoCollator:
    """Examples -> one right-padded batch: input_ids, attention_mask, labels (the reply tokens)
    of each prompt + reply; kto_tag (1 desirable, 0 not); and kl_input_ids, kl_attention_mask,
    kl_labels: each prompt + its kl_reply, within cutoff_len, for the KL estimate."""

    def __init__(self, pad_token_id: int, cutoff_len: int):
        self.pad_token_id, self.cutoff_len = pad_id(pad_token_id), cutoff_len

    def _rows(self, prompts: list[list[int]], replies: list[list[int]], prefix: str) -> dict:
        rows, starts = [], []
        for prompt, reply in zip(prompts, replies):
            keep_prompt, keep_reply = split_budget(len(prompt), len(reply), self.cutoff_len)
            rows.append(prompt[:keep_prompt] + reply[:keep_reply])
            starts.append(keep_prompt)
        batch = pad_rows(rows, self.pad_token_id)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        for i, start in enumerate(starts):
            labels[i, :start] = IGNORE_INDEX
        return {f"{prefix}input_ids": batch["input_ids"], f"{prefix}attention_mask": batch["attention_mask"],
                f"{prefix}labels": labels}

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        prompts = [e["input_ids"][:e["prompt_len"]] for e in examples]
        replies = [e["input_ids"][e["prompt_len"]:] for e in examples]
        mismatched = [e["kl_reply"] for e in examples]
        return {**self._rows(prompts, replies, ""), **self._rows(prompts, mismatched, "kl_"),
                "kto_tag": torch.tensor([e["kto_tag"] for e in examples], dtype=torch.long)}


KTO = RecordKind("kto", to_feedback, encode_feedback)
