"""Preference records (LLaMA-Factory's `ranking: true`) for stage: rm and dpo: a prompt with a
chosen and a rejected reply, each pair encoded twice with the chat template (prompt + chosen,
prompt + rejected) and batched as chosen rows then rejected rows. PAIRWISE makes rm's examples;
PAIRWISE_REPLIES also records where the replies start, so that the collator labels the reply
tokens (dpo scores each reply's log-probability).

- sharegpt: the messages column holds the prompt turns (an optional leading system message,
  then user/assistant turns ending on a user turn); `chosen` and `rejected` each hold one
  assistant message ({"from": "gpt", "value": ...} with the entry's tags).
- alpaca: instruction (+ input, history, system) is the prompt; the `chosen` and `rejected`
  columns hold the replies as text (columns default to "chosen" and "rejected").

A well-typed record that is no usable pair (the prompt does not end on a user turn, roles out of
order, an empty reply) is dropped and counted in one warning line; a value of the wrong type is
refused with one DataError line naming the record and column."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .collate import pad_id
from .encode import IGNORE_INDEX, last_reply_ids, split_budget
from .formats import (Conversation, _blank, _check_columns, _Dropped, _from_alpaca, _message, _refuse, _text,
                      convert_records, role_kinds, sharegpt_turns)
from .loader import RecordKind
from .readers import Records
from .registry import DatasetEntry
from .workers import each

USABLE = "a prompt ending on a user turn, and a non-empty chosen and rejected reply"


@dataclass
class Pair:
    prompt: Conversation  # ends on a user turn
    chosen: str
    rejected: str


def to_pairs(entry: DatasetEntry, records: Records, indices: list[int] | None = None) -> list[Pair]:
    """The records (those at `indices`, in that order, when given) as preference pairs.

    Raises DataError for a missing column, a value of the wrong type, or when no record is a
    usable pair."""
    chosen_column = entry.column("chosen") or "chosen"
    rejected_column = entry.column("rejected") or "rejected"
    columns = {**entry.columns, "chosen": chosen_column, "rejected": rejected_column}
    entry = dataclasses.replace(entry, columns=columns)
    required = ["prompt"] if entry.formatting == "alpaca" else ["messages"]
    _check_columns(entry, records, [*required, "chosen", "rejected"])
    convert = _alpaca_pair if entry.formatting == "alpaca" else _sharegpt_pair
    return convert_records(entry, records, indices, convert, f"pair ({USABLE})")


def _alpaca_pair(entry: DatasetEntry, record: dict, where: str) -> Pair:
    chosen = _text(entry, record, "chosen", where)
    rejected = _text(entry, record, "rejected", where)
    # the prompt as an SFT record would make it, with a placeholder reply taken off again
    conversation = _from_alpaca(entry, {**record, entry.column("response"): "-"}, where)
    conversation.messages.pop()
    return _pair(conversation, chosen, rejected)


def _sharegpt_pair(entry: DatasetEntry, record: dict, where: str) -> Pair:
    tags = entry.tags
    kinds = role_kinds(tags)
    system, turns = sharegpt_turns(entry, record, where, "it must be the list of prompt messages")
    if len(turns) % 2 == 0:
        raise _Dropped("with a prompt that does not end on a user turn")
    if any(_blank(t["content"]) for t in turns if t["role"] in ("user", "assistant")):
        raise _Dropped("with an empty user or assistant turn")
    replies = []
    for key in ("chosen", "rejected"):
        reply_column = entry.column(key)
        value = record[reply_column]
        if isinstance(value, list) and len(value) == 1:  # a one-message list, as some exports write it
            value = value[0]
        message = _message(entry, value, 0, kinds, f"{where} column {reply_column!r}")
        if message["role"] != "assistant":
            raise _refuse(entry, where, f"column {reply_column!r} is a {message['tag']!r} message, not a "
                          f"reply ({tags['assistant_tag']!r})", "fix the record or its tags")
        replies.append(message["content"])
    messages = [{"role": t["role"], "content": t["content"]} for t in turns]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return _pair(Conversation(messages, None, where, entry.name), *replies)


def _pair(prompt: Conversation, chosen: str, rejected: str) -> Pair:
    if _blank(chosen) or _blank(rejected):
        raise _Dropped("with an empty chosen or rejected reply")
    return Pair(prompt, chosen, rejected)


def encode_pairs(pairs: list[Pair], data_args, tokenizer, prompt_len: bool = False) -> list[dict]:
    """{"chosen_ids": [...], "rejected_ids": [...]}: the prompt rendered with the chat template
    up to the reply, then each reply as the template renders it (with EOS where the template
    does not end replies with it). Within cutoff_len, LLaMA-Factory's rule: the budget is split
    between the prompt and the longer reply, and both sequences keep the same start of the
    prompt and the same number of reply tokens, so a pair never becomes two equal sequences.
    With `prompt_len`, each example also holds "prompt_len": the tokens before the replies
    (the same in both sequences)."""
    return each(functools.partial(_encode_pairs, prompt_len=prompt_len), pairs, data_args, tokenizer)


def _encode_pairs(pairs: list[Pair], data_args, tokenizer, prompt_len: bool = False) -> list[dict]:
    """encode_pairs' example of each pair (workers.each runs it)."""
    cutoff_len = getattr(data_args, "cutoff_len", 2048)
    conversations = [Conversation([*pair.prompt.messages, {"role": "assistant", "content": reply}], pair.prompt.tools,
                                  pair.prompt.where, pair.prompt.dataset)
                     for pair in pairs for reply in (pair.chosen, pair.rejected)]
    encoded = last_reply_ids(tokenizer, conversations)
    examples = []
    for i in range(0, len(encoded), 2):
        prompt = encoded[i][0]  # the same text for both replies
        replies = [encoded[i][1], encoded[i + 1][1]]
        keep_prompt, keep_reply = split_budget(len(prompt), max(map(len, replies)), cutoff_len)
        chosen, rejected = (prompt[:keep_prompt] + r[:keep_reply] for r in replies)
        examples.append({"chosen_ids": chosen, "rejected_ids": rejected,
                         **({"prompt_len": keep_prompt} if prompt_len else {})})
    return examples


class PairwiseCollator:
    """Pairs -> one right-padded batch: rows 0..n-1 the chosen sequences, rows n..2n-1 the
    rejected ones (input_ids, attention_mask), and labels (the reply tokens; -100 on the prompt
    and the padding) when the examples hold prompt_len (PAIRWISE_REPLIES)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_id(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        batch = pad_rows(rows, self.pad_token_id)
        if "prompt_len" in examples[0]:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            for i, example in enumerate(examples * 2):
                labels[i, :example["prompt_len"]] = IGNORE_INDEX
            batch["labels"] = labels
        return batch


def pad_rows(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token id lists -> right-padded input_ids and attention_mask."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


PAIRWISE = RecordKind("pairwise", to_pairs, encode_pairs)
PAIRWISE_REPLIES = RecordKind("pairwise", to_pairs, functools.partial(encode_pairs, prompt_len=True))
