"""Plain text for continued pretraining (stage: pt), with LLaMA-Factory's semantics: the text
of each record (the `prompt` column, with `query` after a newline when an alpaca entry maps one;
`columns: {prompt: text}` for c4-style files; each line of a .txt file) gets the tokenizer's EOS
appended; all texts of a group of datasets are tokenized, concatenated and cut into blocks of
cutoff_len tokens (the last partial block is left out), and every token is labelled.

A text that is null or blank is dropped and counted in one warning line per dataset; a value
that is not text is refused with one DataError line naming the record and column."""

from __future__ import annotations

import logging

from tuneforge.errors import DataError
from tuneforge.fileio import quoted

from .formats import _check_columns, _text
from .issues import Drops
from .loader import RecordKind
from .readers import Records
from .registry import DatasetEntry
from .workers import each

logger = logging.getLogger(__name__)


def to_texts(entry: DatasetEntry, records: Records, indices: list[int] | None = None) -> list[tuple[str, str]]:
    """(dataset name, text) of each record (those at `indices`, in that order, when given).

    Raises DataError for sharegpt entries (conversations, not text), a missing text column, a
    value that is not text, or when no record holds any text."""
    if entry.formatting != "alpaca":
        raise DataError(f"dataset {entry.name!r} is sharegpt conversations, and stage: pt reads plain "
                        f"text; register the text column as \"columns\": {{\"prompt\": \"<column>\"}} "
                        f"(no formatting) in {quoted(entry.registry)}, or set stage: sft")
    _check_columns(entry, records, ["prompt"])
    indices = range(len(records)) if indices is None else indices
    drops, kept = Drops(entry.name), []
    for index in indices:
        where = records.where(index)
        record = records[index]
        text = "\n".join(part for part in (_text(entry, record, "prompt", where),
                                            _text(entry, record, "query", where)) if part)
        if text.strip():
            kept.append((entry.name, text))
        else:
            drops.add("with no text", where)
    drops.report(len(indices), f"none of its {len(indices)} records holds any text",
                 "fix those records (or check columns in dataset_info.json)")
    return kept


def to_blocks(texts: list[tuple[str, str]], data_args, tokenizer) -> list[dict]:
    """The texts, each followed by EOS, tokenized, concatenated and cut into blocks of
    cutoff_len tokens: [{"input_ids": block, "labels": block}, ...]. A tokenizer that adds a
    BOS token of its own (add_bos_token) gets it as the first token of every block.

    Raises DataError when the texts make less than one block, or the tokenizer has no EOS."""
    cutoff_len = getattr(data_args, "cutoff_len", 2048)
    eos = tokenizer.eos_token
    if not eos:
        raise DataError("the tokenizer has no eos_token, which stage: pt appends to every text; "
                        "use a model whose tokenizer has one")
    ids = each(_text_ids, texts, data_args, tokenizer)
    stream = [token for piece in ids for token in piece]
    count = len(stream) // cutoff_len
    names = ", ".join(dict.fromkeys(repr(name) for name, _ in texts))
    if count == 0:
        raise DataError(f"the text of dataset {names} makes {len(stream)} tokens, less than one block of "
                        f"cutoff_len={cutoff_len}; lower cutoff_len or add text")
    if len(stream) % cutoff_len:
        logger.info("dataset %s: %d tokens in %d blocks of %d; the last %d tokens are left out", names,
                    len(stream), count, cutoff_len, len(stream) % cutoff_len)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    blocks = []
    for start in range(0, count * cutoff_len, cutoff_len):
        block = stream[start:start + cutoff_len]
        if bos is not None:
            block[0] = bos
        blocks.append({"input_ids": block, "labels": list(block)})
    return blocks


def _text_ids(texts: list[tuple[str, str]], data_args, tokenizer) -> list[list[int]]:
    """The token ids of each text followed by EOS (workers.each runs it)."""
    return tokenizer([text + tokenizer.eos_token for _, text in texts], add_special_tokens=False)["input_ids"]


TEXT = RecordKind("text", to_texts, to_blocks, chat_template=False)
