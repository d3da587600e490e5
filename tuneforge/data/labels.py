"""Classification records (stage: cls and semi): a text and a class label per record.

- The text: the entry's `prompt` column (with `query` after a newline when an alpaca entry maps
  one), so `"columns": {"prompt": "text"}` reads CSV / JSON files with a `text` column.
- The label: the column named by the `label_column` key (default "label"). Labels are all ids
  (whole numbers from 0; in CSV files, digit strings) or all names (strings): names become ids
  in sorted order, read from every dataset of the run (train and eval) before the model loads, so
  the classifier gets their number (`num_labels`) and their names (id2label / label2id).

An example is {"input_ids": [...], "label": id} (the tokenizer's own special tokens, e.g. BERT's
[CLS] ... [SEP], cut to cutoff_len); LabelCollator pads them into input_ids / attention_mask and a
1-D `labels` tensor. An unlabelled dataset (semi's `unlabeled_dataset`) may lack the label
column: its examples get label -1 (or their gold label, when present, for reporting only).

A record whose text is blank is dropped and counted in one warning line; a label of the wrong
type, a missing label column, and labels mixing ids and names are refused with one DataError
line naming the dataset and record."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from tuneforge.errors import ConfigError, DataError
from tuneforge.fileio import quoted

from .formats import _check_columns, _text
from .issues import Drops, describe_value
from .loader import RecordKind, _names
from .readers import read_records
from .registry import get_entry, load_registry, resolve_dataset_dir
from .workers import each

NO_LABEL = -1  # an unlabelled example's label


@dataclass(frozen=True)
class LabelSet:
    """The classes of a run: `names` in id order (None when the data gives ids), and their count."""

    num_labels: int
    names: tuple[str, ...] | None = None

    def id2label(self) -> dict[int, str]:
        return {i: (self.names[i] if self.names else str(i)) for i in range(self.num_labels)}

    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in self.id2label().items()}

    def model_options(self) -> dict:
        """from_pretrained's keyword arguments for a classifier of these classes."""
        return {"num_labels": self.num_labels, "id2label": self.id2label(), "label2id": self.label2id()}

    def to_id(self, value, where: str, dataset: str) -> int:
        """The id of one label value as written in a record (DataError for one that is not a class)."""
        if self.names is not None:
            if isinstance(value, str) and value.strip() in self.names:
                return self.names.index(value.strip())
            raise DataError(f"dataset {dataset!r} ({where}): label {describe_value(value)} is not one of "
                            f"the classes {', '.join(self.names)}; fix the record")
        label = _as_id(value)
        if label is None or label >= self.num_labels:
            raise DataError(f"dataset {dataset!r} ({where}): label {describe_value(value)} is not a class id "
                            f"from 0 to {self.num_labels - 1}; fix the record (or raise num_labels)")
        return label


def _as_id(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _entries(data_args, names: list[str]):
    dataset_dir = resolve_dataset_dir(getattr(data_args, "dataset_dir", None))
    registry = load_registry(dataset_dir, names)
    return [get_entry(dataset_dir, registry, name, "labels") for name in names]


def _label_values(entry, records, label_column: str, required: bool) -> list[tuple[object, str]]:
    """(value, where) of every record's label; DataError for a missing column (when required)."""
    found = []
    for index, record in enumerate(records.items):
        value = record.get(label_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise DataError(f"dataset {entry.name!r} ({records.where(index)}) has no label in column "
                                f"{label_column!r}; label every record, or set label_column to the column "
                                "that holds the labels")
            continue
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DataError(f"dataset {entry.name!r} ({records.where(index)}): label {describe_value(value)} "
                            "is neither a class id (0, 1, ...) nor a class name (a string); fix the record")
        found.append((value, records.where(index)))
    return found


def read_label_set(data_args, label_column: str = "label", num_labels: int = 0,
                   extra: tuple[str, ...] = ()) -> LabelSet:
    """The classes of the datasets in `dataset` and `eval_dataset` (and `extra` names, whose labels
    are optional: semi's unlabelled set). Ids: num_labels or the largest id + 1; names: sorted.

    Raises DataError (a dataset with no label column, labels mixing ids and names, a label of the
    wrong type) and ConfigError (num_labels too small for the ids, or unlike the number of names)."""
    names = _names(getattr(data_args, "dataset", None)) + _names(getattr(data_args, "eval_dataset", None))
    if not names:
        raise DataError("no dataset given: set dataset: to a labelled dataset from dataset_info.json")
    values: list[tuple[object, str, str]] = []
    for required, group in ((True, names), (False, list(extra))):
        for entry in _entries(data_args, group):
            records = read_records(entry, getattr(data_args, "max_samples", None))
            if required and records.items and not any(label_column in r for r in records.items):
                raise DataError(f"dataset {entry.name!r} ({quoted(entry.path)}) has no column {label_column!r}; "
                                "set label_column to the column holding the class labels")
            values += [(v, where, entry.name) for v, where in _label_values(entry, records, label_column, required)]
    ids = [_as_id(v) for v, _, _ in values]
    if all(i is not None for i in ids):
        largest = max(ids, default=0)
        count = num_labels or largest + 1
        if count <= largest:
            raise ConfigError(f"num_labels is {num_labels} but the data holds class id {largest}; set "
                              f"num_labels: {largest + 1} or more (or leave it 0 to count them)")
        if count < 2:
            raise DataError(f"the data of {', '.join(names)} holds one class only; a classifier needs two or more")
        return LabelSet(count)
    if any(isinstance(v, (int, float)) or _as_id(v) is not None for v, _, _ in values):
        value, where, dataset = next((v, w, d) for v, w, d in values if _as_id(v) is not None)
        raise DataError(f"dataset {dataset!r} ({where}): label {describe_value(value)} is an id while other labels "
                        "are names; write every label as a name or every one as an id")
    classes = tuple(sorted({str(v).strip() for v, _, _ in values}))
    if num_labels and num_labels != len(classes):
        raise ConfigError(f"num_labels is {num_labels} but the data names {len(classes)} classes "
                          f"({', '.join(classes[:8])}); fix num_labels or leave it 0")
    if len(classes) < 2:
        raise DataError(f"the data of {', '.join(names)} names one class only ({classes[0] if classes else '-'}); "
                        "a classifier needs two or more")
    return LabelSet(len(classes), classes)


def _label_ids(items: list[tuple[str, str, int]], data_args, tokenizer) -> list[dict]:
    """{"input_ids", "label"} per (dataset, text, label) item (workers.each runs it)."""
    cutoff = getattr(data_args, "cutoff_len", 2048)
    ids = tokenizer([text for _, text, _ in items], truncation=True, max_length=cutoff)["input_ids"]
    return [{"input_ids": list(row), "label": label} for row, (_, _, label) in zip(ids, items)]


def label_kind(labels: LabelSet, label_column: str = "label", required: bool = True) -> RecordKind:
    """The record kind of classification examples for data.load_datasets; `required` False: an
    unlabelled dataset (examples without a label get NO_LABEL)."""

    def convert(entry, records, indices=None) -> list[tuple[str, str, int]]:
        if entry.formatting != "alpaca":
            raise DataError(f"dataset {entry.name!r} is sharegpt conversations, and classification reads a "
                            f"text and a label; register the text column as \"columns\": {{\"prompt\": "
                            f"\"<column>\"}} (no formatting) in {quoted(entry.registry)}")
        _check_columns(entry, records, ["prompt"])
        indices = range(len(records)) if indices is None else indices
        drops, kept = Drops(entry.name), []
        for index in indices:
            where, record = records.where(index), records[index]
            text = "\n".join(p for p in (_text(entry, record, "prompt", where),
                                         _text(entry, record, "query", where)) if p)
            if not text.strip():
                drops.add("with no text", where)
                continue
            value = record.get(label_column)
            if value is None or (isinstance(value, str) and not value.strip()):
                if required:
                    raise DataError(f"dataset {entry.name!r} ({where}) has no label in column {label_column!r}; "
                                    "label every record, or set label_column to the column that holds them")
                kept.append((entry.name, text, NO_LABEL))
            else:
                kept.append((entry.name, text, labels.to_id(value, where, entry.name)))
        drops.report(len(indices), f"none of its {len(indices)} records holds any text",
                     "fix those records (or check columns in dataset_info.json)")
        return kept

    def tokenize(items, data_args, tokenizer) -> list[dict]:
        return each(_label_ids, items, data_args, tokenizer)

    return RecordKind("labels", convert, tokenize, chat_template=False)


def load_labelled(data_args, tokenizer, labels: LabelSet, label_column: str, seed: int):
    """data.load_datasets of classification examples (train, and eval from val_size / eval_dataset)."""
    from .loader import load_datasets

    return load_datasets(data_args, tokenizer, seed=seed, kind=label_kind(labels, label_column))


def load_unlabelled(data_args, names: str, tokenizer, labels: LabelSet, label_column: str, seed: int) -> list[dict]:
    """The examples of the datasets `names` (labels optional: NO_LABEL where absent), unshuffled."""
    from .loader import load_datasets

    args = dataclasses.replace(data_args, dataset=names, eval_dataset=None, val_size=0, multitask=False,
                               mix_strategy="concat", interleave_probs=None)  # the mixing keys are dataset:'s
    examples = load_datasets(args, tokenizer, seed=seed, kind=label_kind(labels, label_column, required=False)).train
    random.Random(seed).shuffle(examples)
    return examples


class LabelCollator:
    """[{"input_ids", "label"}] -> right-padded input_ids, attention_mask and a 1-D `labels`."""

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

