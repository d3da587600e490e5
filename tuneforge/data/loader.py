"""load_datasets: registry names -> tokenized train (and eval) examples, ready for a collator."""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import ConfigError, DataError
from tuneforge.fileio import quoted

from .collate import TASK_ID
from .encode import IGNORE_INDEX, encode_conversations
from .formats import Conversation, fill_placeholders, to_conversations
from .issues import Drops
from .mixing import check as check_mixing, mix
from .readers import read_records
from . import streaming, tokenized
from .registry import get_entry, load_registry, resolve_dataset_dir
from .templates import apply_template
from .workers import each

logger = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass
class DatasetSplits:
    train: list[dict]
    eval: list[dict] | None = None
    # further example sets a stage reads (semi: "unlabeled", its unlabelled examples), by name
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RecordKind:
    """How one kind of record (train.stages.table.RECORD_KINDS) is read and tokenized.

    convert(entry, records, indices) -> items of one dataset (drops counted and warned);
    tokenize(items, data_args, tokenizer) -> examples (dicts of token id lists) of a group of
    datasets; chat_template: whether the chat template is set on the tokenizer first
    (templates.apply_template) or only when `template` is given."""

    name: str
    convert: Callable
    tokenize: Callable
    chat_template: bool = True


def load_datasets(data_args, tokenizer, seed: int = 42, kind: RecordKind | None = None) -> DatasetSplits:
    """Read, convert, tokenize, mix and split the datasets named in `data_args`, as records of
    `kind` (default: conversations, for sft).

    A conversation example is {"input_ids": [...], "labels": [...]} (labels -100 where no loss
    is taken); other kinds say what theirs hold (data/text.py, data/pairwise.py). With
    `multitask: true` every example also carries "task_id", the index of its dataset's name in
    `dataset:` (each dataset is tokenized alone), and eval datasets must be among those names. Sets the chat
    template on the tokenizer (see `apply_template`). With `tokenized_path` the examples are read
    from there when an earlier run saved them with the same settings, else saved there
    (tokenized.py). Records that are not a complete
    conversation, and examples with no reply token left within cutoff_len, are dropped with one
    warning line per dataset that counts them.

    Raises DataError (one line naming the dataset, file, record or line, and the fix) for a bad
    registry, an unreadable or malformed data file, a value of the wrong type, data of another
    kind (preference data for sft, ...), or a dataset with nothing left to train on; ConfigError
    for conflicting or unknown settings.
    """
    kind = kind or CONVERSATIONS
    names = _names(getattr(data_args, "dataset", None))
    if not names:
        raise DataError("no dataset given: set dataset: to one or more names from dataset_info.json, e.g. identity")
    eval_names = _names(getattr(data_args, "eval_dataset", None))
    val_size = getattr(data_args, "val_size", 0) or 0
    if eval_names and val_size:
        raise ConfigError("set either eval_dataset or val_size, not both")
    template = getattr(data_args, "template", None)
    if kind.chat_template or template:
        apply_template(tokenizer, template, getattr(data_args, "enable_thinking", True))
    check_mixing(data_args)
    saved_at = getattr(data_args, "tokenized_path", None)
    _note_unused_keys(data_args, saved_at)
    if getattr(data_args, "streaming", False):  # LLaMA-Factory's streaming: train examples read lazily
        streaming.check_streaming(data_args)
        stream = streaming.StreamingExamples(data_args, tokenizer, seed, kind, names, skip=int(val_size))
        if eval_names:
            return DatasetSplits(stream, _load_datasets(data_args, tokenizer, seed, kind, eval_names, [], 0).train)
        return DatasetSplits(stream, streaming.take_eval(stream, int(val_size)) if val_size else None)
    if saved_at:  # LLaMA-Factory's tokenized_path: read the examples saved by an earlier run, else save them
        saved_at, stamp = Path(saved_at).expanduser(), tokenized.fingerprint(data_args, tokenizer, kind)
        saved = tokenized.load_saved(saved_at, stamp, bool(getattr(data_args, "overwrite_cache", False)))
        if saved is not None:
            return DatasetSplits(*saved)
        splits = _load_datasets(data_args, tokenizer, seed, kind, names, eval_names, val_size)
        tokenized.save(saved_at, stamp, splits.train, splits.eval)
        return splits
    return _load_datasets(data_args, tokenizer, seed, kind, names, eval_names, val_size)


def _load_datasets(data_args, tokenizer, seed: int, kind: RecordKind, names: list[str], eval_names: list[str],
                   val_size: float) -> DatasetSplits:
    dataset_dir = resolve_dataset_dir(getattr(data_args, "dataset_dir", None))
    registry = load_registry(dataset_dir, [*names, *eval_names])

    def read(name: str) -> list:
        return _read_dataset(dataset_dir, registry, name, getattr(data_args, "max_samples", None),
                             random.Random(seed), kind)

    def load(group: list[str], key: str) -> list[dict]:
        if not multitask:  # the records mixed (mix_strategy), then tokenized together
            return kind.tokenize(mix([read(name) for name in group], data_args, seed, key, group), data_args,
                                 tokenizer)
        parts = []
        for name in group:  # each dataset alone (pt's blocks never span two tasks), tagged with its task
            parts.append(kind.tokenize(read(name), data_args, tokenizer))
            for example in parts[-1]:
                example[TASK_ID] = names.index(name)
        return mix(parts, data_args, seed, key, group)

    multitask = bool(getattr(data_args, "multitask", False))
    if multitask:
        _check_tasks(names, eval_names)

    train = load(names, "dataset")
    random.Random(seed).shuffle(train)  # mixes several datasets, and makes the val_size split random
    if eval_names:
        return DatasetSplits(train, load(eval_names, "eval_dataset"))
    if val_size:
        return _split(train, val_size)
    return DatasetSplits(train, None)


def _note_unused_keys(data_args, saved_at) -> None:
    """LLaMA-Factory's overwrite_cache, said where it changes nothing (never silently ignored)."""
    if getattr(data_args, "overwrite_cache", False) and not saved_at:
        logger.info("overwrite_cache: nothing to overwrite without tokenized_path (tuneforge keeps no other "
                    "cache of tokenized data)")


def _check_tasks(names: list[str], eval_names: list[str]) -> None:
    """multitask: true: two or more distinct datasets (the tasks), and eval datasets among them."""
    if len(names) < 2:
        raise ConfigError(f"config key 'multitask' needs two or more datasets in dataset: (each dataset is a task); "
                          f"got {','.join(names)!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"config key 'dataset' lists {', '.join(twice)} twice; with multitask: true each dataset "
                          "is one task: list each once")
    unknown = [n for n in eval_names if n not in names]
    if unknown:
        raise ConfigError(f"config key 'eval_dataset' names {', '.join(unknown)}, which is not in dataset: "
                          f"({','.join(names)}); with multitask: true each eval dataset must be one of the tasks")


def _names(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    return [name.strip() for name in str(value or "").split(",") if name.strip()]


def _read_dataset(dataset_dir: Path, registry: dict, name: str, max_samples: int | None,
                  rng: random.Random, kind: RecordKind) -> list:
    entry = get_entry(dataset_dir, registry, name, kind.name)
    records = read_records(entry, None if entry.num_samples else max_samples,
                           text_lines=kind.name == "text")
    if not records:
        raise DataError(f"dataset {name!r} ({quoted(entry.source)}) has no records; add some or pick another dataset")
    indices = None
    if entry.num_samples:  # LLaMA-Factory: a random num_samples of them, repeated when more are asked
        count = len(records)
        indices = rng.sample(range(count), min(count, entry.num_samples))
        indices += rng.choices(range(count), k=entry.num_samples - len(indices))
        indices = indices[:max_samples] if max_samples is not None else indices
        logger.info("dataset %r: num_samples=%d of its %d records%s", name, entry.num_samples, count,
                    " (some repeated)" if entry.num_samples > count else "")
    return kind.convert(entry, records, indices)


def _tokenize(conversations: list[Conversation], data_args, tokenizer) -> list[dict]:
    fill_placeholders(conversations, getattr(data_args, "placeholders", None))
    _warn_unfilled(conversations)
    cutoff_len = getattr(data_args, "cutoff_len", 2048)
    examples = each(_encode, conversations, data_args, tokenizer)
    kept, totals, drops = [], Counter(c.dataset for c in conversations), {}
    for conversation, example in zip(conversations, examples):
        if any(label != IGNORE_INDEX for label in example["labels"]):
            kept.append(example)
        else:  # never trained on as an empty example
            drops.setdefault(conversation.dataset, Drops(conversation.dataset)).add(
                "with no reply token left", conversation.where)
    for name, dropped in drops.items():
        dropped.report(totals[name], f"none of its {totals[name]} examples keeps a reply token within "
                       f"cutoff_len={cutoff_len}", f"raise cutoff_len (now {cutoff_len}) to keep them")
    return kept


def _encode(conversations: list[Conversation], data_args, tokenizer) -> list[dict]:
    """{"input_ids", "labels"} per conversation (one each, in order; workers.each runs it)."""
    return encode_conversations(tokenizer, conversations, cutoff_len=getattr(data_args, "cutoff_len", 2048),
                                train_on_prompt=getattr(data_args, "train_on_prompt", False),
                                mask_history=getattr(data_args, "mask_history", False))


def _warn_unfilled(conversations: list[Conversation]) -> None:
    keys = sorted({key for c in conversations for m in c.messages for key in _PLACEHOLDER.findall(m["content"])})
    if keys:
        wanted = ", ".join(f"{key}: ..." for key in keys)
        logger.warning("the data holds placeholders %s with no value; set placeholders: {%s}",
                       ", ".join("{{" + key + "}}" for key in keys), wanted)


def _split(examples: list[dict], val_size: float) -> DatasetSplits:
    """Hold out val_size examples (a fraction below 1, a count from 1) of the shuffled examples."""
    if val_size < 0:
        raise ConfigError(f"val_size must be >= 0; got {val_size}")
    count = math.ceil(len(examples) * val_size) if val_size < 1 else int(val_size)
    if count >= len(examples):
        raise DataError(
            f"val_size={val_size} holds out {count} of {len(examples)} examples and leaves none to train on; "
            "lower val_size"
        )
    return DatasetSplits(examples[count:], examples[:count])


CONVERSATIONS = RecordKind("conversations", to_conversations, _tokenize)
